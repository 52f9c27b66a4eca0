"""SMS segments: how many carrier messages a text takes, the billing unit of messages.

The usual carrier rule (3GPP TS 23.038 / 23.040): a text that fits the GSM 7-bit
default alphabet takes 160 septets in one segment (an extension-table character,
such as `€` or `{`, takes two); longer texts are split into segments of 153
septets, the rest of each holding the concatenation header (UDH). A text with
any other character is sent as UCS-2: 70 UTF-16 code units in one segment, 67
per segment when concatenated. A character outside the BMP takes two code units.
"""
from __future__ import annotations

__all__ = ["GSM7_BASIC", "GSM7_EXTENDED", "encoding", "segments", "split", "parts"]

GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM7_EXTENDED = frozenset("\f^{}\\[~]|€")


def encoding(text: str) -> str:
    """`GSM-7` when every character is in the GSM default alphabet, else `UCS-2`."""
    for ch in text:
        if ch not in GSM7_BASIC and ch not in GSM7_EXTENDED:
            return "UCS-2"
    return "GSM-7"


def _units(text: str, enc: str) -> list[int]:
    if enc == "GSM-7":
        return [2 if ch in GSM7_EXTENDED else 1 for ch in text]
    return [2 if ord(ch) > 0xFFFF else 1 for ch in text]


def split(text: str) -> list[str]:
    """The text cut into carrier segments (never inside a character that takes two units)."""
    enc = encoding(text)
    units = _units(text, enc)
    single, multi = (160, 153) if enc == "GSM-7" else (70, 67)
    if sum(units) <= single:
        return [text]
    out, start, used = [], 0, 0
    for i, n in enumerate(units):
        if used + n > multi:
            out.append(text[start:i])
            start, used = i, 0
        used += n
    out.append(text[start:])
    return out


def segments(text: str) -> int:
    """How many segments `text` takes (an empty text still takes one)."""
    return len(split(text)) if text else 1


def parts(text: str, rule: str, most: int) -> list[str]:
    """The MESSAGE bodies a trunk with this rule (`[trunks.NAME] message_split`,
    `message_max`) takes `text` in, in order; ValueError saying why when it is too long.

    "segments": one body per carrier segment (`split`), at most `most` of them;
    "none": the whole text in one body of at most `most` UTF-8 octets."""
    if rule == "none":
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > most:
            raise ValueError(f"the text is {size} octets, over the trunk's limit of {most}")
        return [text]
    out = split(text)
    if len(out) > most:
        raise ValueError(f"the text takes {len(out)} segments, over the trunk's limit of {most}")
    return out
