"""Call quality from the ITU-T G.107 E-model, simplified for G.711 (see docs/load.md).

    R  = R0 - Id - Ie_eff                      (Is and A taken as 0, R0 = 93.2)
    Ie_eff = Ie + (95 - Ie) * Ppl / (Ppl + Bpl)  (random loss, BurstR = 1)
    Id = 0.024 d + 0.11 (d - 177.3) H(d - 177.3) (Cole & Rosenbluth's fit of G.107's Idd)
    MOS = 1 + 0.035 R + 7e-6 R (R - 60) (100 - R)   for 0 < R < 100

G.711 has Ie = 0 and, with packet loss concealment, Bpl = 25.1 (G.113 Appendix I;
4.3 without concealment). `d` is the one-way mouth-to-ear delay in ms: the network
delay plus the jitter buffer a receiver needs (twice the RFC 3550 jitter) plus one
packet time of packetization.
"""
from __future__ import annotations

R0 = 93.2
IE = {"PCMU": 0.0, "PCMA": 0.0}
BPL = {"PCMU": 25.1, "PCMA": 25.1}
PACKET_MS = 20.0


def mouth_to_ear(delay_ms: float, jitter_ms: float) -> float:
    """One-way delay as the E-model counts it: network + jitter buffer + packetization."""
    return max(delay_ms, 0.0) + 2.0 * max(jitter_ms, 0.0) + PACKET_MS


def r_factor(loss_pct: float, delay_ms: float, codec: str = "PCMU") -> float:
    """R for `loss_pct` % random packet loss and a one-way (mouth-to-ear) delay in ms."""
    ie, bpl = IE.get(codec, 0.0), BPL.get(codec, 25.1)
    ppl = min(max(loss_pct, 0.0), 100.0)
    ie_eff = ie + (95.0 - ie) * ppl / (ppl + bpl)
    d = max(delay_ms, 0.0)
    idd = 0.024 * d + (0.11 * (d - 177.3) if d > 177.3 else 0.0)
    return max(0.0, min(100.0, R0 - idd - ie_eff))


def mos(r: float) -> float:
    """G.107 Annex B: the estimated mean opinion score for a rating R."""
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    return 1.0 + 0.035 * r + 7e-6 * r * (r - 60.0) * (100.0 - r)
