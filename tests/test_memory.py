"""memory: huge-page buffers behave as torch.empty; the glibc setting is idempotent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowrank_tools.linalg.memory import empty_huge, stream_large_buffers


@pytest.mark.parametrize("shape", [(3, 5), (2048, 1024), (1, 4 << 20)])  # below, at and above the 4 MiB floor
def test_empty_huge_is_an_ordinary_tensor(shape):
    t = empty_huge(shape, torch.bfloat16)
    assert t.shape == shape and t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()
    src = torch.randn(shape)
    t.copy_(src)  # written in full, as the sketch does
    assert torch.equal(t, src.bfloat16())


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off or absent")
def test_huge_page_advice_is_taken():
    from lowrank_tools.linalg.memory import _advise_huge_pages

    assert _advise_huge_pages(torch.empty(4096, 1024))  # 16 MiB: the kernel accepts the aligned interior
    assert not _advise_huge_pages(torch.empty(256, 1024))  # 1 MiB: below the floor, left alone


def test_stream_large_buffers_is_idempotent():
    first = stream_large_buffers()
    assert stream_large_buffers() == first
