"""Tile sizes for the Pallas-Triton kernels, whose blocks must hold a power-of-two number of elements."""


def largest_tile(size: int, limit: int, smallest: int = 1) -> int | None:
    """The largest power of two <= ``limit`` (a power of two) and >= ``smallest`` dividing ``size``; None if none."""
    tile = limit
    while tile >= smallest:
        if size % tile == 0:
            return tile
        tile //= 2
    return None
