"""Random generators and seeds. tinyset never touches torch's global RNG and never seeds from the clock:
every random choice is drawn from an explicit :class:`torch.Generator` derived from the user's seed."""
from __future__ import annotations

import torch


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """An explicit, seeded generator. tinyset never touches the global RNG."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def derive_seed(generator: torch.Generator) -> int:
    """Draw a fresh 62-bit seed from ``generator`` (for child generators)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator).item())
