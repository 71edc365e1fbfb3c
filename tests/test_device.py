"""to_device: uint8 to float on the device, normalization, the caller's tensors untouched."""

from __future__ import annotations

import torch

from lance_cookbook import to_device


def test_to_device_does_not_modify_float_input():
    images = torch.full((1, 3, 2, 2), 0.5)
    out, _ = to_device((images, torch.zeros(1, dtype=torch.int64)), "cpu", (0.5,) * 3, (0.25,) * 3)
    assert torch.equal(images, torch.full((1, 3, 2, 2), 0.5)) and out.abs().max() == 0
