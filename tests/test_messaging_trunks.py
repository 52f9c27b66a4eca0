"""Texts to a trunk go out by the trunk's rule (`[trunks.NAME] message_split`,
`message_max`): a body over one carrier segment as one MESSAGE per segment, in
order (a raw UDP socket plays the trunk and answers each part); the text is
`sent` once every part was accepted, `undelivered` with the SIP code of the
first part refused; a trunk that takes texts whole gets one MESSAGE; registered
users get the whole body; a text over the trunk's limit is refused."""
from __future__ import annotations

import asyncio

import pytest

from engine.common.segments import parts, split
from tests.helpers import UdpClient
from tests.test_messaging import answer, next_request
from tests.test_messaging_services import register
from tests.test_rest_more import Rest, rest_config


def test_parts_cut_at_the_carrier_boundaries():
    # GSM-7: 160 septets in one MESSAGE, else 153 a part.
    assert parts("a" * 160, "segments", 10) == ["a" * 160]
    assert [len(p) for p in parts("a" * 161, "segments", 10)] == [153, 8]
    assert [len(p) for p in parts("a" * 307, "segments", 10)] == [153, 153, 1]
    # An escape (`€` is ESC + one septet) is never cut: at 152 septets the next
    # part takes it.
    body = "a" * 152 + "€" + "b" * 20
    cut = parts(body, "segments", 10)
    assert cut == ["a" * 152, "€" + "b" * 20] and "".join(cut) == body
    # UCS-2: 70 code units in one, else 67; a character outside the BMP (a
    # surrogate pair, two units) is never cut.
    assert [len(p) for p in parts("ж" * 70, "segments", 10)] == [70]
    assert [len(p) for p in parts("ж" * 71, "segments", 10)] == [67, 4]
    body = "ж" * 66 + "😀" + "ж" * 10
    cut = parts(body, "segments", 10)
    assert cut == ["ж" * 66, "😀" + "ж" * 10] and "".join(cut) == body
    # One non-GSM character makes the whole text UCS-2.
    assert [len(p) for p in split("a" * 100 + "ж")] == [67, 34]
    # The limits: parts with "segments", UTF-8 octets with "none".
    assert len(parts("a" * 153 * 3, "segments", 3)) == 3
    with pytest.raises(ValueError, match="4 segments, over the trunk's limit of 3"):
        parts("a" * (153 * 3 + 1), "segments", 3)
    assert parts("ж" * 100, "none", 200) == ["ж" * 100]
    with pytest.raises(ValueError, match="202 octets"):
        parts("ж" * 101, "none", 200)


def trunk_config(port: int) -> dict:
    raw = rest_config(port)
    raw["trunks"]["carrier"]["message_max"] = 3
    raw["trunks"]["spare"].update(message_split="none", message_max=200)
    raw["accounts"]["acme"]["api_tokens"] = [API]
    return raw


API = "acme-grpc-token-0123456789abcdef"


async def parts_received(trunk: UdpClient, n: int, statuses=()) -> list:
    """The next `n` MESSAGEs at `trunk`, each answered (202 unless `statuses` says)."""
    got = []
    for i in range(n):
        req = await next_request(trunk, timeout=5)
        got.append(req)
        answer(trunk, req, statuses[i] if i < len(statuses) else 202)
    return got


async def final(rest: Rest, sid: str) -> dict:
    for _ in range(200):
        code, m = await rest("GET", f"/Messages/{sid}.json")
        assert code == 200, m
        if m["status"] not in ("queued", "sending"):
            return m
        await asyncio.sleep(0.02)
    raise AssertionError(f"text {sid} is still {m['status']}")


async def test_long_texts_go_to_a_trunk_in_parts_and_whole_to_others():
    from tests.helpers import running_engine

    trunk = UdpClient("127.0.0.1", 9)       # answers the engine's MESSAGEs, sends nothing else
    async with running_engine(trunk_config(trunk.local_port)) as eng:
        trunk.port = eng.sip_port           # where its answers go
        rest = Rest(eng)
        # GSM-7, 3 segments: three MESSAGEs, in order, to the account's first trunk.
        body = "".join(chr(ord("a") + i % 26) for i in range(400))
        code, m = await rest("POST", "/Messages.json", To="+15551234567", From="1000", Body=body)
        assert code == 201 and m["num_segments"] == "3", m
        got = await parts_received(trunk, 3)
        assert [r.uri for r in got] == ["sip:+15551234567@127.0.0.1"] * 3
        assert [len(r.body) for r in got] == [153, 153, 94]
        assert b"".join(r.body for r in got).decode() == body
        done = await final(rest, m["sid"])
        assert (done["status"], done["num_segments"], done["baton_sip_code"]) == ("sent", "3", 202)

        # UCS-2: 67 characters a part; every part 200 makes it delivered.
        body = "Привет" * 13 + "!!"      # 80 characters, not all in GSM-7: 2 segments
        code, m = await rest("POST", "/Messages.json", To="+15551234567", From="1000",
                             Body=body)
        assert code == 201 and m["num_segments"] == "2", m
        got = await parts_received(trunk, 2, (200, 200))
        assert [len(r.body.decode()) for r in got] == [67, 13]
        assert "".join(r.body.decode() for r in got) == body
        assert (await final(rest, m["sid"]))["status"] == "delivered"

        # A part refused: the rest are not sent, and the text is undelivered with its code.
        body = "x" * 300
        code, m = await rest("POST", "/Messages.json", To="+15551234567", From="1000", Body=body)
        assert code == 201 and m["num_segments"] == "2"
        await parts_received(trunk, 1, (486,))
        done = await final(rest, m["sid"])
        assert (done["status"], done["baton_sip_code"]) == ("undelivered", 486), done
        assert done["error_message"].startswith("part 1 of 2: 486")
        code, m = await rest("POST", "/Messages.json", To="+15551234567", From="1000", Body=body)
        await parts_received(trunk, 2, (202, 480))
        done = await final(rest, m["sid"])
        assert (done["status"], done["baton_sip_code"]) == ("undelivered", 480), done
        assert done["error_message"].startswith("part 2 of 2: 480")
        with pytest.raises(asyncio.TimeoutError):
            await next_request(trunk, timeout=0.3)

        # Over the trunk's 3 segments: refused naming the body, nothing sent.
        code, err = await rest("POST", "/Messages.json", To="+15551234567", From="1000",
                               Body="y" * (153 * 3 + 1))
        assert (code, err["code"]) == (400, 21617) and "4 segments" in err["message"], err
        # gRPC Messages.Send: the same rule, the same refusal naming `body`.
        import grpc

        from proto import pb

        mp = pb.messages_pb2
        async with grpc.aio.insecure_channel(f"127.0.0.1:{eng.grpc_port}") as ch:
            api = pb.messages_pb2_grpc.MessagesStub(ch)
            md = (("authorization", f"Bearer {API}"),)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await api.Send(mp.MessagesSendRequest(to="+15551234567", body="y" * 460), metadata=md)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("body: trunk carrier: the text takes 4")
            sent = await api.Send(mp.MessagesSendRequest(to="+15551234567", body="v" * 200,
                                                 trunk="carrier"), metadata=md)
            assert sent.segments == 2
            got = await parts_received(trunk, 2)
            assert [r.body for r in got] == [b"v" * 153, b"v" * 47]
        # A module's text over the limit fails with 413, nothing sent.
        m = eng.messaging.notify("acme", "+15551234567", "y" * 500, module="baton.bot",
                                 trunk="carrier")
        for _ in range(100):
            if m.status == "failed":
                break
            await asyncio.sleep(0.01)
        assert (m.status, m.sip_code) == ("failed", 413) and "limit of 3" in m.error
        # A module's text to a + number with no trunk named takes the account's first
        # trunk (a verification code, a call centre's notice), by its rule.
        m = eng.messaging.notify("acme", "+15551234567", "u" * 170, module="baton.verify")
        got = await parts_received(trunk, 2)
        assert [r.body for r in got] == [b"u" * 153, b"u" * 17]
        for _ in range(100):
            if m.status == "sent":
                break
            await asyncio.sleep(0.01)
        assert (m.status, m.segments) == ("sent", 2)

        # A trunk that takes texts whole: one MESSAGE up to its 200 octets.
        body = "z" * 190
        code, m = await rest("POST", "/Messages.json", To="+15551234567", From="1000",
                             Body=body, Trunk="spare")
        assert code == 201 and m["num_segments"] == "2"
        (req,) = await parts_received(trunk, 1)
        assert req.uri == "sip:0015551234567@127.0.0.1" and req.body.decode() == body
        assert (await final(rest, m["sid"]))["status"] == "sent"
        code, err = await rest("POST", "/Messages.json", To="+15551234567", From="1000",
                               Body="z" * 201, Trunk="spare")
        assert (code, err["code"]) == (400, 21617) and "201 octets" in err["message"], err
        code, err = await rest("POST", "/Messages.json", To="+15551234567", From="1000",
                               Body="hi", Trunk="nosuch")
        assert (code, err["code"]) == (400, 21211) and "nosuch" in err["message"], err

        # A registered user gets the whole body in one MESSAGE, whatever its length.
        alice = UdpClient("127.0.0.1", eng.sip_port)
        await register(alice, eng.sip_port, "alice", "alice-secret-1")
        body = "w" * 600
        code, m = await rest("POST", "/Messages.json", To="alice", From="1000", Body=body)
        assert code == 201 and m["num_segments"] == "4"
        (req,) = await parts_received(alice, 1)
        assert req.body.decode() == body
        assert (await final(rest, m["sid"]))["status"] == "sent"
        with pytest.raises(asyncio.TimeoutError):
            await next_request(trunk, timeout=0.2)
        alice.close()
    trunk.close()


@pytest.mark.parametrize("keys,field,why", [
    ({"message_split": "words"}, "message_split", "segments or none"),
    ({"message_max": 0}, "message_max", "from 1 to 65536"),
    ({"message_max": "10"}, "message_max", "from 1 to 65536"),
])
def test_trunk_text_rules_are_checked(keys, field, why):
    from engine.config.load import ConfigError, from_dict

    raw = rest_config(5090)
    raw["trunks"]["carrier"].update(keys)
    with pytest.raises(ConfigError, match=f"trunks.carrier.{field}.*{why}"):
        from_dict(raw, "<test>")
    raw["trunks"]["carrier"] = {"proxy": "127.0.0.1:5090", "message_split": "none"}
    t = from_dict(raw, "<test>").trunks["carrier"]
    assert (t.message_split, t.message_max) == ("none", 1300)
