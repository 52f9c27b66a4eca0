"""`baton queues`: call-centre queue statistics and agents, read from a running
engine over gRPC (`baton.v1.CallCenter`).

    baton queues [--engine HOST:PORT] [--token TOKEN] [--queue NAME] [--format table|json]
    baton queues --set-agent NAME=available|offline

The token is one of the account's `api_tokens` (also read from the
environment variable BATON_API_TOKEN).
"""
from __future__ import annotations

import json
import os
import sys

TOKEN_ENV = "BATON_API_TOKEN"


def add_parser(sub) -> None:
    q = sub.add_parser("queues", help="call-centre queue statistics and agents (over gRPC)",
                       description="Queue statistics (waiting, longest wait, served, abandoned, "
                                   "agents by state, average wait) and agents of the "
                                   "baton.call_center service, from a running engine.")
    q.add_argument("--engine", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="the engine's gRPC address (default 127.0.0.1:50051)")
    q.add_argument("--token", default=None,
                   help=f"an account API token (default: ${TOKEN_ENV})")
    q.add_argument("--queue", default="", metavar="NAME", help="only this queue")
    q.add_argument("--set-agent", default=None, metavar="NAME=STATE",
                   help="sign an agent in or out: NAME=available or NAME=offline")
    q.add_argument("--format", choices=("table", "json"), default="table")
    q.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    q.set_defaults(func=run)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}:{s % 60:02d}"


def run(args) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from proto import pb

    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        print(f"baton: an API token is needed (--token or ${TOKEN_ENV})", file=sys.stderr)
        return 2
    ccp = pb.call_center_pb2
    md = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(args.engine) as channel:
        stub = pb.call_center_pb2_grpc.CallCenterStub(channel)
        try:
            if args.set_agent:
                name, sep, state = args.set_agent.partition("=")
                if not sep or not name:
                    print("baton: --set-agent NAME=available|offline", file=sys.stderr)
                    return 2
                agent = stub.SetAgentState(ccp.SetAgentStateRequest(agent=name, state=state),
                                           metadata=md, timeout=args.timeout)
                print(json.dumps(MessageToDict(agent, preserving_proto_field_name=True))
                      if args.format == "json" else f"{agent.name}: {agent.state}")
                return 0
            stats = stub.QueueStats(ccp.QueueStatsRequest(queue=args.queue), metadata=md,
                                    timeout=args.timeout)
            agents = stub.ListAgents(ccp.ListAgentsRequest(queue=args.queue), metadata=md,
                                     timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"baton: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.format == "json":
        out = {"queues": [MessageToDict(q, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
                          for q in stats.queues],
               "agents": [MessageToDict(a, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
                          for a in agents.agents]}
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'QUEUE':<16} {'WAITING':>7} {'LONGEST':>8} {'SERVED':>7} {'ABANDONED':>9} "
          f"{'TIMEOUT':>7} {'FULL':>5} {'AVG WAIT':>8}  AGENTS (avail/busy/wrap/off)")
    for q in stats.queues:
        a = q.agents
        print(f"{q.name:<16} {q.waiting:>7} {_fmt_seconds(q.longest_wait_seconds):>8} "
              f"{q.served:>7} {q.abandoned:>9} {q.timed_out:>7} {q.rejected_full:>5} "
              f"{_fmt_seconds(q.average_wait_seconds):>8}  "
              f"{a.available}/{a.busy}/{a.wrap_up}/{a.offline}")
    if agents.agents:
        print()
        print(f"{'AGENT':<16} {'STATE':<10} {'CALLS':>5} {'IDLE':>6}  {'QUEUES':<24} CONTACT")
        for a in agents.agents:
            idle = _fmt_seconds(a.idle_seconds) if a.state == "available" else "-"
            print(f"{a.name:<16} {a.state:<10} {a.calls:>5} {idle:>6}  "
                  f"{','.join(a.queues):<24} {a.contact or '-'}")
    return 0


__all__ = ["add_parser", "run"]
