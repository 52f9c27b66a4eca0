"""Micro-benchmarks of the SIP parser, both implementations.

Parsing and stream-framing the INVITE of SIPp's built-in uac scenario
(~500 bytes, 10 header fields, SDP body):

    .venv/bin/python -m pytest bench/micro/test_parser_bench.py --benchmark-only
"""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ext import sip_py as parser_py  # noqa: E402

try:
    from ext import sip as c_sip
except ImportError:  # not built: only the reference is measured
    c_sip = None

IMPLS = [pytest.param(c_sip, id="c", marks=pytest.mark.skipif(c_sip is None, reason="ext.sip not built")),
         pytest.param(parser_py, id="py")]

SDP = (b"v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
       b"t=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
INVITE = (b"INVITE sip:service@127.0.0.1:5060 SIP/2.0\r\n"
          b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0\r\n"
          b"From: sipp <sip:sipp@127.0.0.1:5061>;tag=4242SIPpTag001\r\n"
          b"To: service <sip:service@127.0.0.1:5060>\r\n"
          b"Call-ID: 1-4242@127.0.0.1\r\n"
          b"CSeq: 1 INVITE\r\n"
          b"Contact: sip:sipp@127.0.0.1:5061\r\n"
          b"Max-Forwards: 70\r\n"
          b"Subject: Performance Test\r\n"
          b"Content-Type: application/sdp\r\n"
          b"Content-Length: %d\r\n\r\n" % len(SDP)) + SDP


@pytest.mark.parametrize("mod", IMPLS)
def test_parse_invite(benchmark, mod):
    benchmark.group = f"parse_message: {len(INVITE)}-byte INVITE"
    m = benchmark(mod.parse_message, INVITE)
    assert m.error is None and m.via_branch == "z9hG4bK-4242-1-0" and m.body == SDP


@pytest.mark.parametrize("mod", IMPLS)
def test_frame_invite(benchmark, mod):
    benchmark.group = "frame_length: the same INVITE on a stream"
    assert benchmark(mod.frame_length, INVITE) == len(INVITE)
