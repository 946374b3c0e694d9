"""UMT5 text encoder: both checkpoint layouts, the official encode semantics, key maps, file errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers import UMT5EncoderModel

from wanfast.config import TextEncoderConfig
from wanfast.loading.t5_keys import (
    HF_EMBED,
    HF_EMBED_TIED,
    config_from_hf,
    config_from_official_state_dict,
    hf_config,
    hf_to_official,
    official_to_hf,
)
from wanfast.loading.text_encoder import (
    build_text_encoder,
    load_diffusers_text_encoder,
    load_official_text_encoder,
    load_tokenizer,
)
from wanfast.models.text_encoder import clean_prompt
from wanfast.specs import SPECS
from wanfast.tools.testing_text import (
    random_official_t5_state_dict,
    write_diffusers_t5,
    write_official_t5,
    write_tiny_tokenizer,
)

CFG = SPECS["tiny"].text_encoder
SEED = 7
PROMPTS = [
    "the cat walks on the street",
    "A  red car &amp; a blue bird fly over the river at night, slow motion!",
    "",
    "dog",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    return {
        "tok": write_tiny_tokenizer(root / "tokenizer", CFG.vocab_size),
        "pth": write_official_t5(root / "models_t5.pth", CFG, SEED, dtype=torch.float32),
        "single": write_diffusers_t5(root / "single" / "text_encoder", CFG, SEED),
        "sharded": write_diffusers_t5(root / "sharded" / "text_encoder", CFG, SEED, shards=3),
        "root": root,
    }


@pytest.fixture(scope="module")
def official(files):
    return load_official_text_encoder(files["pth"], files["tok"], "cpu", torch.float32, text_len=CFG.text_len)


def official_forward(sd: dict, cfg: TextEncoderConfig, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The official T5Encoder math (wan/modules/t5.py), written out independently of transformers."""

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.eps)

    b, n = ids.shape
    h, d = cfg.num_heads, cfg.head_dim
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query
    half = cfg.num_buckets // 2  # bidirectional: one half per direction
    exact = half // 2
    dist = rel.abs()
    large = exact + (
        torch.log(dist.clamp(min=1) / exact) / math.log(cfg.max_distance / exact) * (half - exact)
    )
    bucket = (rel > 0).long() * half + torch.where(dist < exact, dist, large.long().clamp(max=half - 1))

    def w(i, name):
        return sd[f"blocks.{i}.{name}.weight"]

    x = sd["token_embedding.weight"][ids]
    for i in range(cfg.num_layers):
        y = rms(x, w(i, "norm1"))
        q, k, v = (F.linear(y, w(i, f"attn.{c}")).view(b, n, h, d) for c in "qkv")
        s = torch.einsum("bihd,bjhd->bhij", q, k) + w(i, "pos_embedding.embedding")[bucket].permute(2, 0, 1)
        s = s.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        a = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v).reshape(b, n, h * d)
        x = x + F.linear(a, w(i, "attn.o"))
        y = rms(x, w(i, "norm2"))
        gate = F.gelu(F.linear(y, w(i, "ffn.gate.0")), approximate="tanh")
        x = x + F.linear(F.linear(y, w(i, "ffn.fc1")) * gate, w(i, "ffn.fc2"))
    return rms(x, sd["norm.weight"])


# (a) both layouts, from the same random weights, encode identically


def test_official_and_diffusers_layouts_agree(files, official):
    ref = official.encode(PROMPTS)
    for key in ("single", "sharded"):
        te = load_diffusers_text_encoder(
            files[key], files["tok"], "cpu", torch.float32, text_len=CFG.text_len
        )
        assert te.cfg == official.cfg == CFG
        for a, b in zip(ref, te.encode(PROMPTS), strict=True):
            assert a.dtype == b.dtype == torch.float32
            assert torch.equal(a, b)


def test_bf16_official_file_and_tied_embedding(files, tmp_path):
    pth = write_official_t5(tmp_path / "bf16.pth", CFG, SEED, dtype=torch.bfloat16)
    te = load_official_text_encoder(pth, files["tok"], "cpu", torch.bfloat16, text_len=CFG.text_len)
    m = te.model
    assert m.shared.weight.data_ptr() == m.encoder.embed_tokens.weight.data_ptr()  # one copy of the table
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in m.state_dict().values())
    out = te.encode(PROMPTS[:2])
    assert [o.dtype for o in out] == [torch.bfloat16] * 2
    assert all(torch.isfinite(o.float()).all() for o in out)


# (b) encode(): trimmed to the real token count, unaffected by padding, the official math


def test_encode_lengths_and_matches_unpadded_runs(official):
    sd = random_official_t5_state_dict(CFG, SEED)
    out = official.encode(PROMPTS)
    assert len(out) == len(PROMPTS)
    for prompt, o in zip(PROMPTS, out, strict=True):
        ids = official.tokenizer(clean_prompt(prompt), add_special_tokens=True)["input_ids"]
        assert ids[-1] == official.tokenizer.eos_token_id == 1
        assert o.shape == (len(ids), CFG.dim)
        single = torch.tensor([ids])
        with torch.no_grad():
            direct = official.model(
                input_ids=single, attention_mask=torch.ones_like(single)
            ).last_hidden_state
        torch.testing.assert_close(o, direct[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(o, official_forward(sd, CFG, single, torch.ones_like(single))[0],
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    assert out[2].shape == (1, CFG.dim)  # an empty prompt is just EOS


def test_padded_batch_matches_official_math_and_mask_matters(official):
    sd = random_official_t5_state_dict(CFG, SEED)
    ids, mask = official.tokenize(PROMPTS)
    assert ids.shape == (len(PROMPTS), CFG.text_len)  # padded to text_len, as officially
    assert (ids[mask == 0] == 0).all()
    ref = official_forward(sd, CFG, ids, mask)
    for o, r, n in zip(official.encode(PROMPTS), ref, mask.sum(1).tolist(), strict=True):
        torch.testing.assert_close(o, r[:n], atol=1e-4, rtol=1e-4)
    # Sanity: without the mask the padding would leak in, so the comparisons above can fail.
    first = official.encode(PROMPTS[:1])[0]
    unmasked = official.model(input_ids=ids).last_hidden_state[0, : len(first)]
    assert not torch.allclose(unmasked, first, atol=1e-3)


def test_pad_to_longest_equals_pad_to_text_len(official):
    longest = build_text_encoder(CFG, dict(official.model.state_dict()), official.tokenizer, "cpu",
                                 torch.float32, pad_to_text_len=False)  # fmt: skip
    assert longest.tokenize(PROMPTS)[0].shape[1] < CFG.text_len
    for a, b in zip(official.encode(PROMPTS), longest.encode(PROMPTS), strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


def test_long_prompt_truncated_with_eos(official):
    (o,) = official.encode(["the cat " * 100])
    assert o.shape == (CFG.text_len, CFG.dim)
    ids, _ = official.tokenize(["the cat " * 100])
    assert ids[0, -1].item() == 1


# (c) key maps and configs


def test_key_map_round_trip_full_coverage():
    sd = random_official_t5_state_dict(CFG, 0)
    hf = official_to_hf(sd)
    with torch.device("meta"):
        model_keys = set(UMT5EncoderModel(hf_config(CFG)).state_dict())
    assert set(hf) == model_keys  # every weight of the model, nothing else
    assert hf[HF_EMBED] is hf[HF_EMBED_TIED] is sd["token_embedding.weight"]
    back = hf_to_official(hf)
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)
    # Files may store only one of the tied pair.
    for drop in (HF_EMBED, HF_EMBED_TIED):
        one = {k: v for k, v in hf.items() if k != drop}
        assert hf_to_official(one).keys() == sd.keys()
    assert official_to_hf(back).keys() == hf.keys()
    # The gated FFN pairing: GELU branch gate.0 <-> wi_0, linear branch fc1 <-> wi_1.
    assert hf["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"] is sd["blocks.1.ffn.gate.0.weight"]
    assert hf["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"] is sd["blocks.1.ffn.fc1.weight"]
    with pytest.raises(ValueError, match="blocks.0.attn.extra.weight"):
        official_to_hf({**sd, "blocks.0.attn.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="decoder.final_layer_norm.weight"):
        hf_to_official({**hf, "decoder.final_layer_norm.weight": torch.zeros(1)})


def test_config_from_official_state_dict_reads_heads_from_rel_pos_table():
    assert config_from_official_state_dict(random_official_t5_state_dict(CFG), text_len=CFG.text_len) == CFG
    other = replace(CFG, num_heads=2, head_dim=16, num_buckets=16, num_layers=3, ffn_dim=48)
    sd = random_official_t5_state_dict(other)
    assert sd["blocks.0.pos_embedding.embedding.weight"].shape == (16, 2)
    got = config_from_official_state_dict(sd, text_len=CFG.text_len)
    assert (got.num_heads, got.head_dim, got.num_buckets, got.num_layers, got.ffn_dim) == (2, 16, 16, 3, 48)
    with pytest.raises(ValueError, match="token_embedding.weight"):
        config_from_official_state_dict({k: v for k, v in sd.items() if k != "token_embedding.weight"})


def test_hf_config_umt5_xxl_facts_and_round_trip():
    c = hf_config(TextEncoderConfig())
    assert (c.d_model, c.d_ff, c.num_heads, c.d_kv) == (4096, 10240, 64, 64)
    assert (c.num_layers, c.vocab_size) == (24, 256384)
    assert (c.relative_attention_num_buckets, c.relative_attention_max_distance) == (32, 128)
    assert (c.dense_act_fn, c.is_gated_act, c.layer_norm_epsilon) == ("gelu_new", True, 1e-6)
    assert (c.pad_token_id, c.eos_token_id) == (0, 1)
    assert config_from_hf(hf_config(CFG).to_dict(), text_len=CFG.text_len) == CFG
    with pytest.raises(ValueError, match="feed_forward_proj"):
        config_from_hf({**hf_config(CFG).to_dict(), "feed_forward_proj": "relu"})


def test_strict_load_names_missing_and_unexpected_keys(official):
    sd = dict(official.model.state_dict())
    sd.pop("encoder.block.1.layer.0.SelfAttention.k.weight")
    sd["encoder.block.9.layer.0.layer_norm.weight"] = torch.ones(CFG.dim)
    with pytest.raises(ValueError, match=r"missing keys: encoder\.block\.1\.layer\.0\.SelfAttention\.k") as e:
        build_text_encoder(CFG, sd, official.tokenizer, "cpu", torch.float32)
    assert "encoder.block.9.layer.0.layer_norm.weight" in str(e.value)


# (d) file errors name the file


def test_missing_files_raise_file_not_found_naming_the_path(files, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_official_text_encoder(missing, files["tok"])
    with pytest.raises(FileNotFoundError, match="no_tokenizer"):
        load_official_text_encoder(files["pth"], tmp_path / "no_tokenizer", text_len=CFG.text_len)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers_text_encoder(tmp_path, files["tok"])
    with pytest.raises(FileNotFoundError, match="no_tok"):
        load_tokenizer(tmp_path / "no_tok")
    # An index naming a shard that is not there.
    folder = write_diffusers_t5(tmp_path / "te", CFG, SEED, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_diffusers_text_encoder(folder, files["tok"], text_len=CFG.text_len)


def test_truncated_files_raise_value_error_naming_the_file(files, tmp_path):
    pth = tmp_path / "cut.pth"
    data = files["pth"].read_bytes()
    pth.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pth"):
        load_official_text_encoder(pth, files["tok"], text_len=CFG.text_len)
    folder = write_diffusers_t5(tmp_path / "te", CFG, SEED)
    st = folder / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_diffusers_text_encoder(folder, files["tok"], text_len=CFG.text_len)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_diffusers_text_encoder(folder, files["tok"], text_len=CFG.text_len)


def test_tokenizer_round_trips_through_autotokenizer(files):
    tok = load_tokenizer(files["tok"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == CFG.vocab_size
    index = json.loads((files["sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3


# (e) prompt cleaning as the official 'whitespace' mode


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a cat\n\n\tsits   here  ", "a cat sits here"),
        ("fish &amp; chips", "fish & chips"),
        ("fish &amp;amp; chips", "fish & chips"),  # unescaped twice
        ("&lt;b&gt;bold&lt;/b&gt;", "<b>bold</b>"),
        ("caf\u00c3\u00a9 au lait", "café au lait"),  # ftfy repairs mojibake
        ("a\u00a0\u3000b", "a b"),  # unicode spaces collapse too
        ("", ""),
    ],
)
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean
