"""``wanfast bench`` on the tiny preset (CPU): end to end with and without the Diffusers peer, the JSON
and PNG it writes, the composed estimate, the engine ladder, argument errors, and the peer's model builds."""

from __future__ import annotations

import argparse
import json
import struct
import sys

import pytest
import torch

from wanfast.config import ConfigError, EngineSettings
from wanfast.tools import bench
from wanfast.tools.bench_peer import Clock

SMALL = ["--model", "tiny", "--sizes", "32x32", "--frames", "5", "--steps", "2", "--repeats", "1"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wanfast")
    bench.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def run(tmp_path, argv: list[str]) -> tuple[int, dict]:
    args = parse([*SMALL, *argv, "--json", str(tmp_path / "b.json"), "--png", str(tmp_path / "b.png")])
    rc = args.func(args)
    return rc, json.loads((tmp_path / "b.json").read_text())


@pytest.fixture(scope="module")
def with_peer(tmp_path_factory):
    pytest.importorskip("diffusers")
    tmp = tmp_path_factory.mktemp("bench")
    rc, report = run(tmp, ["--compare", "eager,default", "--peer", "diffusers", "--warmup", "0", "--check"])
    return rc, report, tmp


def rows(report: dict, **match) -> list[dict]:
    return [r for r in report["measurements"] if all(r.get(k) == v for k, v in match.items())]


def test_end_to_end_with_the_diffusers_peer(with_peer):
    rc, report, _ = with_peer
    assert rc == 0
    assert {
        "tool",
        "date",
        "environment",
        "config",
        "engines",
        "measurements",
        "checks",
        "notes",
        "png",
    } <= set(report)
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"] == torch.__version__
    assert report["config"]["model"] == "tiny" and report["config"]["sizes"] == ["32x32"]
    assert [e["name"] for e in report["engines"]] == ["eager", "default", "diffusers"]
    for r in report["measurements"]:
        assert r["kind"] in ("measured", "composed") and r["seconds"] > 0, r
        if r["kind"] == "measured":
            assert r["times_s"] and all(t > 0 for t in r["times_s"]), r
    for what in bench.WHATS:
        assert rows(report, what=what, impl="wanfast", kind="measured"), what
        assert rows(report, what=what, impl="diffusers", kind="measured"), what
    for r in rows(report, impl="wanfast"):  # every wanfast row has its Diffusers counterpart
        assert r["vs_diffusers"] > 0, r
    gen = rows(report, engine="default", what="generate", kind="measured")[0]
    assert gen["steps"] == 2 and set(gen["stages_s"]) == {
        "text_encoding",
        "conditioning",
        "denoise",
        "vae_decode",
    }
    assert len(gen["step_times_s"]) == 2 and gen["steps_per_expert"] == {"high_noise": 1, "low_noise": 1}
    assert rows(report, engine="diffusers", what="generate", kind="measured")[0]["step_times_s"]


def test_compare_gives_one_entry_per_engine(with_peer):
    _, report, _ = with_peer
    for what in ("forward", "step", "generate"):
        engines = [r["engine"] for r in rows(report, what=what, kind="measured")]
        assert engines == ["eager", "default", "diffusers"], (what, engines)
    eager, default = report["engines"][0]["settings"], report["engines"][1]["settings"]
    assert not any(
        eager[k]
        for k in (
            "fuse_projections",
            "cache_cross_kv",
            "cache_rope",
            "compile",
            "cuda_graphs",
            "optimize_vae",
        )
    )  # plain(): the VAE decode rewrite is off in the eager reference too
    assert default == {
        **eager,
        "fuse_projections": True,
        "cache_cross_kv": True,
        "cache_rope": True,
        "compile": None,
        "fp8_row_kernels": True,
        "optimize_vae": True,
    }
    assert [r["vs_first"] for r in rows(report, engine="eager", impl="wanfast")] == [1.0] * len(
        rows(report, engine="eager")
    )


def test_check_reports_the_relative_error_of_the_final_latents(with_peer):
    _, report, _ = with_peer
    (check,) = report["checks"]
    assert (check["engine"], check["reference"], check["steps"]) == ("default", "eager", 2)
    assert 0 <= check["relative_error"] <= 2e-2 and check["ok"]


def test_composed_estimate_is_the_sum_of_its_measured_terms(with_peer):
    _, report, _ = with_peer
    composed = rows(report, kind="composed")
    assert {r["engine"] for r in composed} == {"eager", "default", "diffusers"}
    for r in composed:
        t = r["terms"]
        assert r["steps"] == 40
        expected = t["text_encoding"]["seconds"] + 40 * t["step"]["seconds"] + t["vae_decode"]["seconds"]
        assert r["seconds"] == pytest.approx(expected, rel=1e-12)
        step = rows(report, engine=r["engine"], what="step", kind="measured")[0]
        text = rows(report, impl=r["impl"], what="text")[0]
        assert t["step"] == {"seconds": step["seconds"], "from": "step"}
        assert t["text_encoding"] == {"seconds": text["seconds"], "from": "text"}
        gen = rows(report, engine=r["engine"], what="generate", kind="measured")[0]
        assert r["at_measured_steps"]["measured_s"] == gen["seconds"]


def test_png_is_written_and_valid(with_peer):
    _, report, tmp = with_peer
    data = (tmp / "b.png").read_bytes()
    assert report["png"] == str(tmp / "b.png") and report["png_error"] is None
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 200 and height > 100


def test_without_peer_and_composed_from_the_generation(tmp_path):
    rc, report = run(
        tmp_path, ["--what", "generate", "--peer", "none", "--compare", "eager", "--warmup", "1"]
    )
    assert rc == 0
    assert [e["name"] for e in report["engines"]] == ["eager"]
    assert not rows(report, impl="diffusers") and not any("vs_diffusers" in r for r in report["measurements"])
    gen = rows(report, what="generate", kind="measured")[0]
    assert len(gen["warmup_times_s"]) == 1 and gen["warmup_times_s"][0] > 0
    (composed,) = rows(report, kind="composed")
    t = composed["terms"]
    assert t["vae_decode"] == {"seconds": gen["stages_s"]["vae_decode"], "from": "generate"}
    assert t["step"]["from"] == "generate: median step"
    expected = t["text_encoding"]["seconds"] + 40 * t["step"]["seconds"] + t["vae_decode"]["seconds"]
    assert composed["seconds"] == pytest.approx(expected, rel=1e-12)
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_SIGNATURE


def test_ladder_adds_one_switch_per_rung():
    base = EngineSettings(device="cpu")
    names = [n for n, _ in bench.LADDER]
    ladder = [bench.engine_settings(n, base) for n in names]
    assert ladder[0] == base.plain() and bench.engine_settings("default", base) == base
    for prev, cur, (_, switches) in zip(ladder[:-1], ladder[1:], bench.LADDER[1:], strict=True):
        changed = {k for k in vars(cur) if getattr(cur, k) != getattr(prev, k)}
        assert changed == set(switches)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "832"], "WIDTHxHEIGHT"),
        (["--sizes", "axb"], "WIDTHxHEIGHT"),
        (["--compare", "eager,turbo"], "eager, fused, cross_kv, rope, compiled, graphs, default"),
        (["--what", "forward,forward"], "no repeats"),
        (["--peer", "other"], "invalid choice"),
    ],
)
def test_bad_arguments_are_rejected_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "100x64"], "multiple of 16"),
        (["--frames", "6"], "4n\\+1"),
        (["--steps", "0"], ">= 1"),
        (["--check", "--what", "forward"], "add generate to --what"),
        (["--repeats", "0"], "--repeats"),
        (["--dtype", "int3"], "unknown dtype"),
    ],
)
def test_bad_requests_fail_before_any_model_is_built(argv, message, tmp_path):
    args = parse([*SMALL, *argv, "--json", str(tmp_path / "x.json")])
    with pytest.raises(ConfigError, match=message):
        bench.bench_main(args)
    assert not (tmp_path / "x.json").exists()


def test_missing_matplotlib_is_said_loudly(with_peer, tmp_path, monkeypatch, capsys):
    _, report, _ = with_peer
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    monkeypatch.setattr(bench, "run_bench", lambda args: dict(report))
    args = parse([*SMALL, "--json", str(tmp_path / "x.json"), "--png", str(tmp_path / "x.png")])
    assert bench.bench_main(args) == 0
    assert "NO PNG WRITTEN: matplotlib is not importable" in capsys.readouterr().err
    written = json.loads((tmp_path / "x.json").read_text())
    assert (
        written["png"] is None and "matplotlib" in written["png_error"] and not (tmp_path / "x.png").exists()
    )


def test_missing_accel_fails_loudly(monkeypatch):
    from wanfast.tools import bench_peer

    monkeypatch.setitem(sys.modules, "wanfast.accel", None)  # as if the package were absent
    monkeypatch.setitem(sys.modules, "wanfast.accel.vae", None)
    with pytest.raises(ConfigError, match="wanfast.accel is not importable"):
        bench_peer._accel()
    with pytest.raises(ConfigError, match="wanfast.accel.vae is not importable"):
        bench_peer._accel("wanfast.accel.vae")


def test_clock_steps_splits_warmup_and_measured_steps():
    def loop(n, on_step):
        for _ in range(n):
            on_step()

    out = Clock(torch.device("cpu")).steps(loop, warmup=2, repeats=3)
    assert len(out["warmup_times_s"]) == 2 and len(out["times_s"]) == 3
    assert out["seconds"] == sorted(out["times_s"])[1] and out["peak_memory_bytes"] is None


def test_diffusers_transformer_built_on_meta_equals_a_plain_build():
    """The peer's DiT is built on meta and materialised on the device; its non-persistent RoPE buffers and
    its outputs must equal those of an ordinary build with the same random values."""
    diffusers = pytest.importorskip("diffusers")
    from wanfast.loading import dit_keys
    from wanfast.specs import SPECS
    from wanfast.tools.diffusers_models import _init_kwargs, pad_text, random_transformer
    from wanfast.tools.synthetic import randomize_

    preset = SPECS["tiny"]
    model = random_transformer(preset, torch.device("cpu"), torch.float32, seed=5)
    cls = diffusers.WanTransformer3DModel
    ref = randomize_(cls.from_config(_init_kwargs(cls, dit_keys.diffusers_config_json(preset.dit))), 5).eval()
    for name, buf in ref.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buf), name
    x, t = torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0])
    ctx = pad_text(torch.randn(7, preset.dit.text_dim), preset.dit.text_len)
    with torch.no_grad():
        out = model(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
        expected = ref(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]
    assert torch.equal(out, expected) and out.std() > 0
    bf16 = random_transformer(preset, torch.device("cpu"), torch.bfloat16, seed=5)
    dtypes = {n: p.dtype for n, p in bf16.named_parameters()}
    assert dtypes["scale_shift_table"] == torch.float32  # kept as Diffusers' from_pretrained keeps it
    assert (
        dtypes["blocks.0.norm2.weight"] == torch.float32
        and dtypes["blocks.0.ffn.net.2.weight"] == torch.bfloat16
    )


def test_peer_alone_and_merge_give_the_ratios_of_one_run(tmp_path, monkeypatch):
    """Runs too long to hold both implementations (40 steps at 720p) are timed apart and merged."""
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "benchmarks"))
    from merge_bench import merge

    monkeypatch.setenv("WANFAST_COMMIT", "abc1234")
    what = ["--what", "generate", "--warmup", "0"]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    rc_a, ours = run(tmp_path / "a", [*what, "--compare", "default", "--peer", "none"])
    rc_b, peer = run(tmp_path / "b", [*what, "--compare", "none", "--peer", "diffusers"])
    assert rc_a == rc_b == 0 and ours["environment"]["commit"] == "abc1234"
    assert {r["impl"] for r in peer["measurements"]} == {"diffusers"} and peer["config"]["compare"] == []
    merged = merge([ours, peer])
    gen = [r for r in merged["measurements"] if r["impl"] == "wanfast" and r["what"] == "generate"]
    peer_gen = {r["kind"]: r for r in merged["measurements"] if r["impl"] == "diffusers"}
    assert {r["kind"] for r in gen} == {"measured", "composed"}
    for r in gen:
        assert r["vs_diffusers"] == pytest.approx(r["seconds"] / peer_gen[r["kind"]]["seconds"])
    assert [e["name"] for e in merged["engines"]] == ["default", "diffusers"] and len(merged["runs"]) == 2
    assert "vs diffusers" in bench.format_table(merged)


def test_compare_none_needs_a_peer(tmp_path):
    with pytest.raises(ConfigError, match="peer alone"):
        run(tmp_path, ["--what", "generate", "--compare", "none", "--peer", "none"])


def test_quant_reaches_every_wanfast_engine(tmp_path):
    rc, report = run(tmp_path, ["--what", "forward", "--compare", "eager,default", "--peer", "none",
                                "--quant", "fp8", "--warmup", "0"])  # fmt: skip
    assert rc == 0 and report["config"]["quant"] == "fp8"
    assert [e["settings"]["quant"] for e in report["engines"]] == ["fp8", "fp8"]
    assert all(r["seconds"] > 0 for r in rows(report, what="forward", kind="measured"))


def test_compile_mode_reaches_every_wanfast_engine(tmp_path):
    rc, report = run(tmp_path, ["--what", "forward", "--compare", "eager,default", "--peer", "none",
                                "--compile-mode", "coordinate-descent", "--warmup", "0"])  # fmt: skip
    assert rc == 0 and report["config"]["compile_mode"] == "coordinate-descent"
    assert [e["settings"]["compile_mode"] for e in report["engines"]] == ["coordinate-descent"] * 2
