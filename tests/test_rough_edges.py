"""What a new user trips over, each fixed once and kept fixed: a fast `--help`, bad flags refused before
anything loads (with every bad line of a prompts file named), a missing extra named in one line, no
temporary folders left behind, the official frame conversion, and the CLI and the server refusing the
same bad requests with the same words."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from wanfast.cli import main
from wanfast.config import ConfigError
from wanfast.server.schemas import VideoRequest, validate_request
from wanfast.specs import SPECS
from wanfast.video import to_uint8_frames


def test_help_imports_no_model_code():
    code = "import sys; from wanfast.cli import build_parser; build_parser(['--help']); print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))  # noqa: S307 - our own subprocess's module list
    assert not loaded & {"torch", "transformers", "diffusers", "fastapi", "uvicorn"}, loaded


def test_frames_truncate_as_the_official_saver():
    # official: (x.clamp(-1, 1) + 1) / 2 (make_grid's normalize), then (x * 255).type(uint8): truncation
    values = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.999, 1.0, 1.5])
    video = values.view(1, -1, 1, 1).expand(3, -1, 1, 2)
    got = to_uint8_frames(video)[:, 0, 0, 0].tolist()
    assert got == [0, 0, 127, 191, 254, 255, 255]  # rounding would give 0, 0, 128, 191, 255, 255, 255


def test_fps_zero_is_refused(no_loading, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "tiny", "--prompt", "x", "--fps", "0"])
    assert e.value.code == 2 and "--fps: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_prompts_file_names_every_bad_line_and_keeps_unicode_separators(no_loading, tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "ok"}, {"prompt": "x", "size": "40x48"}, {"prompt": "y", "frames": 6}, "not json"]
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines))
    assert main(["generate", "--model", "tiny", "--prompts-file", str(path)]) == 2
    err = capsys.readouterr().err
    for n in (2, 3, 4):
        assert f"line {n}:" in err, err
    assert "(3 bad lines)" in err
    # U+2028 inside a JSON string is text, not a line break (str.splitlines would split the line in two)
    from wanfast.batch import read_prompts_file

    path.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n")
    items = read_prompts_file(path, {}, SPECS["tiny"], tmp_path / "o.mp4")
    assert len(items) == 1 and items[0].prompt == "a\u2028b"


def test_a_tiny_run_leaves_no_temporary_folder(tmp_path):
    before = set(Path(tempfile.gettempdir()).glob("wanfast-tiny-*"))
    out = tmp_path / "t.mp4"
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--frames", "1",
                 "--output", str(out), "--no-progress"]) == 0  # fmt: skip
    assert out.is_file() and set(Path(tempfile.gettempdir()).glob("wanfast-tiny-*")) <= before


def test_vae_decode_stage_is_shown(tmp_path, capsys):
    out = tmp_path / "t.mp4"
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--steps", "1", "--frames", "1",
                 "--output", str(out)]) == 0  # fmt: skip
    assert "decoding the video (VAE)" in capsys.readouterr().err


def test_a_missing_extra_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now raises ModuleNotFoundError
    assert main(["serve", "--model", "tiny", "--device", "cpu", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "wanfast: error: uvicorn is not installed: pip install 'wanfast[serve]'"


def test_load_pipeline_defaults_to_the_cpu_without_cuda(tiny_official):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine picks cuda: the CPU default is checked where there is none (CI)")
    import wanfast

    pipe = wanfast.load_pipeline(tiny_official)
    assert pipe.device.type == "cpu" and pipe.settings.dtype == torch.float32 and pipe.spec.name == "tiny"


@pytest.mark.parametrize(
    "flags, body",
    [
        (["--size", "40x48"], {"size": "40x48"}),
        (["--frames", "6"], {"frames": 6}),
        (["--boundary", "2"], {"boundary": 2.0}),
        (["--cfg-steps", "-1"], {"cfg_steps": -1}),
    ],
)
def test_cli_and_server_refuse_alike(no_loading, capsys, flags, body):
    assert main(["generate", "--model", "tiny", "--prompt", "x", *flags]) == 2
    cli = capsys.readouterr().err.strip().removeprefix("wanfast: error: ")
    try:
        validate_request(VideoRequest(prompt="x", **body), SPECS["tiny"], 100)
    except ConfigError as e:
        server = str(e)
    except ValueError as e:  # pydantic's range check at the door comes first for some fields
        server = str(e)
        pytest.fail(f"the server refused at the schema, not with the shared rule: {server}")
    else:
        pytest.fail("the server accepted it")
    assert cli == server
