"""How numbers read in the tray: rates in Mbit/s, sizes in decimal units, short durations.

Pure functions (no Qt) so the tray, the dashboard and the tests agree on every label.
"""

from __future__ import annotations

_RATES = (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3))
_SIZES = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


def format_rate(bits_per_second: float | None) -> str:
    """A link rate as people read it: 48.1 Mbit/s; idle links show 0 kbit/s, not a blank."""
    if bits_per_second is None:
        return "–"
    for unit, scale in _RATES:
        if bits_per_second >= scale:
            value = bits_per_second / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{bits_per_second / 1e3:.0f} kbit/s" if bits_per_second else "0 kbit/s"


def format_bytes(n: float | None) -> str:
    """Data used, in the decimal units carriers bill in."""
    if n is None:
        return "–"
    for unit, scale in _SIZES:
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def format_duration(seconds: float) -> str:
    """How long the tunnel has been up: 42 s, 5 min 07 s, 3 h 12 min, 2 d 4 h."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def format_ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms" if value < 10 else f"{value:.0f} ms"


def format_loss(value: float | None) -> str:
    return (
        "–" if value is None else f"{value * 100:.1f} %" if value < 0.1 else f"{value * 100:.0f} %"
    )


def parse_size(text: str) -> int | None:
    """'10 GB', '500M', '1.5G' → bytes; '' → None (no cap). Raises ValueError with a reason."""
    text = text.strip().upper().replace(" ", "").removesuffix("B")
    if not text:
        return None
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"not a size: {text!r} (write e.g. 10 GB or 500 MB)") from None
    if value <= 0:
        raise ValueError("a data cap must be more than zero")
    return int(value)
