"""What diffusers (0.42) does with our DoRA, bias and norm outputs of a pipeline (tiny SD 1.x, no download): the
README's consumer table is pinned here, so a diffusers release that changes any of it fails a test.

- kohya file with dora_scale: loaded as plain LoRA (diffusers filters dora_scale out with a warning).
- kohya file with diff_b / w_norm / b_norm: refused (ValueError naming the keys).
- diffusers file (lora_magnitude_vector): the UNet's DoRA modules fuse to our DoRA weights; the text encoder's
  magnitudes are dropped by its loader (transformers reports them MISSING), so those modules are not our weights.
- diffusers file with lora_B.bias (extract --keep-bias): the factors fuse, the bias deltas are not applied.
"""

from __future__ import annotations

import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from lowrank_tools.io.formats import load_adapter  # noqa: E402
from test_diffusers_consumer import fine_tune, load_and_fuse, run, tiny_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """base/ and tuned/ SD pipelines: every matrix rank-2 changed, every 1-D tensor (biases, norms) changed too."""
    tmp = tmp_path_factory.mktemp("sd-extras")
    g = torch.Generator().manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_pipeline(tmp, sdxl=False)
        pipe.save_pretrained(tmp / "base")
        fine_tune(pipe)
        with torch.no_grad():
            for comp in ("unet", "text_encoder"):
                for p in getattr(pipe, comp).parameters():
                    if p.ndim == 1:
                        p += 0.05 * torch.randn(p.shape, generator=g)
        pipe.save_pretrained(tmp / "tuned")
    return tmp


def _extract(tmp, out, *flags, rank=4):
    """rank 1 < the planted rank 2 for DoRA: m = ||W'_tuned||_row then differs from ||W0 + s B A||_row."""
    res = run("extract", tmp / "base", tmp / "tuned", "-o", out, "-r", rank, "-q", *flags)
    assert res.exit_code == 0, res.output
    return load_adapter(out)


def _dora_weight(W0, m):
    """Our DoRA weight of module m on W0 (float64, matrix view), and the plain W0 + s B A."""
    W = W0.double().reshape(m.matrix_shape) + m.delta_matrix().double()
    return (m.magnitude.double().reshape(-1) / W.norm(dim=1)).unsqueeze(1) * W, W


def _rel(a, b):
    return float((a.double().reshape(b.shape) - b).norm() / b.norm())


def test_kohya_dora_file_loads_as_plain_lora(sd, tmp_path):
    adapter = _extract(sd, tmp_path / "d.safetensors", "--format", "kohya", "--dora", rank=1)
    w0, fused = load_and_fuse(sd / "base", tmp_path / "d.safetensors", False)
    for name, m in adapter.modules.items():
        dora, plain = _dora_weight(w0[f"{name}.weight"], m)
        assert _rel(fused[f"{name}.weight"], plain) < 1e-5, name  # the magnitude is dropped
        assert _rel(fused[f"{name}.weight"], dora) > 1e-4, name


@pytest.mark.parametrize("flag,suffix", [("--keep-bias", "diff_b"), ("--keep-norms", "w_norm")])
def test_kohya_bias_and_norm_deltas_are_refused(sd, tmp_path, flag, suffix):
    _extract(sd, tmp_path / "x.safetensors", "--format", "kohya", flag)
    with pytest.raises(ValueError, match=rf"(?s)not been correctly renamed.*\.{suffix}"):
        load_and_fuse(sd / "base", tmp_path / "x.safetensors", False)


def test_diffusers_dora_file_fuses_to_our_weights_in_the_unet_only(sd, tmp_path):
    adapter = _extract(sd, tmp_path / "d", "--dora", "--exclude", "embed", rank=1)  # PEFT's use_dora: all modules or none
    w0, fused = load_and_fuse(sd / "base", tmp_path / "d", False)
    unet = [n for n in adapter.modules if n.startswith("unet.")]
    text = [n for n in adapter.modules if n.startswith("text_encoder.")]
    assert unet and text
    for name in unet:
        dora, _ = _dora_weight(w0[f"{name}.weight"], adapter.modules[name])
        assert _rel(fused[f"{name}.weight"], dora) < 1e-5, name
    for name in text:  # the text encoder's loader drops lora_magnitude_vector (MISSING)
        dora, _ = _dora_weight(w0[f"{name}.weight"], adapter.modules[name])
        assert _rel(fused[f"{name}.weight"], dora) > 1e-3, name


def test_diffusers_lora_bias_file_fuses_factors_but_not_biases(sd, tmp_path):
    adapter = _extract(sd, tmp_path / "b", "--keep-bias")
    assert adapter.tensor_deltas
    w0, fused = load_and_fuse(sd / "base", tmp_path / "b", False)
    for name, m in adapter.modules.items():
        if m.kind.value != "embedding":
            assert _rel(fused[f"{name}.weight"], w0[f"{name}.weight"].double().reshape(m.matrix_shape)
                        + m.delta_matrix().double()) < 1e-5, name
    for key in adapter.tensor_deltas:
        assert torch.equal(fused[key], w0[key]), key  # diffusers 0.42 applies no lora_B.bias
