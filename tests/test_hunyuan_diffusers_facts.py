"""Measured behaviour of diffusers' HunyuanVideo LoRA converter on ``final_layer.adaLN_modulation.1``
(docs/format-facts-hunyuan.md): lora_B's rows are swapped (right) and lora_A's rank halves too (wrong); rank 1 and a
kohya ``.alpha`` on that module make it raise. Each test fails the day diffusers changes the behaviour."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers as convert  # noqa: E402

K = "final_layer.adaLN_modulation.1"
OUT = "transformer.norm_out.linear"


def factors(r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, r, generator=g, dtype=torch.float64), torch.randn(r, 16, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("r", [2, 3, 4])
def test_lora_a_rank_halves_are_swapped_so_the_product_is_wrong(r):
    B, A = factors(r)
    out = convert({f"{K}.lora_A.weight": A.clone(), f"{K}.lora_B.weight": B.clone()})
    A2, B2 = out[f"{OUT}.lora_A.weight"], out[f"{OUT}.lora_B.weight"]
    h = (r + 1) // 2  # torch.chunk(2): the first piece takes ceil(r/2)
    assert torch.equal(B2, torch.cat([B[16:], B[:16]]))  # the right conversion, alone
    assert torch.equal(A2, torch.cat([A[h:], A[:h]]))  # and the wrong one
    d = B @ A
    want = torch.cat([d[16:], d[:16]])
    assert torch.linalg.matrix_norm(B2 @ A2 - want) > 0.5 * torch.linalg.matrix_norm(want)
    assert torch.allclose(B2 @ A, want)  # B's swap with A untouched is exact


def test_rank_one_and_an_alpha_on_that_module_do_not_load():
    B, A = factors(1)
    with pytest.raises(ValueError, match="not enough values to unpack"):
        convert({f"{K}.lora_A.weight": A.clone(), f"{K}.lora_B.weight": B.clone()})
    B, A = factors(2)
    with pytest.raises(RuntimeError, match="chunk expects at least a 1-dimensional tensor"):
        convert({f"{K}.lora_A.weight": A, f"{K}.lora_B.weight": B, f"{K}.alpha": torch.tensor(2.0)})
