"""`baton.v1.CallCenter`: queue statistics and agent states of `baton.call_center`.

Every call is authenticated with an account API token (`authorization:
Bearer TOKEN`) and sees only that account's queues and the agents serving
them: another account's queue or agent is NOT_FOUND, exactly as one that
does not exist. A platform operator's token (`[engine] operator_tokens`)
sees every account's queues and agents.
"""
from __future__ import annotations

import grpc

from engine.modules.services.call_center import CallCenter

from proto import pb
from control.auth import AuthError, Authority, in_scope

ccp = pb.call_center_pb2
MAX_NAME = 128      # queue and agent names: longer ones are refused, not looked up


def queue_message(d: dict) -> ccp.QueueStat:
    a = d["agents"]
    return ccp.QueueStat(
        name=d["name"], account=d["account"], waiting=d["waiting"],
        longest_wait_seconds=d["longest_wait"], served=max(d["served"], 0),
        abandoned=d["abandoned"], timed_out=d["timed_out"], rejected_full=d["full"],
        average_wait_seconds=d["average_wait"], average_handle_seconds=d["average_handle"],
        max_size=d["max_size"],
        agents=ccp.AgentCounts(available=a["available"], busy=a["busy"],
                               wrap_up=a["wrap-up"], offline=a["offline"]),
        callers=[ccp.WaitingCaller(session_id=c["session_id"], position=c["position"],
                                   waited_seconds=c["waited"], ringing_agent=c["agent"],
                                   announcement=c["announcement"]) for c in d["callers"]])


def agent_message(d: dict) -> ccp.Agent:
    return ccp.Agent(name=d["name"], state=d["state"], user=d["user"], contact=d["contact"],
                     queues=d["queues"], idle_seconds=d["idle"], calls=d["calls"],
                     session_id=d["session_id"], signed_out=d["signed_out"])


class CallCenterService(pb.call_center_pb2_grpc.CallCenterServicer):
    """The CallCenter service of one engine."""

    def __init__(self, engine, authority: Authority):
        self.engine = engine
        self.authority = authority

    async def _account(self, context) -> str | None:
        """The caller's account, or None for an operator (every account)."""
        try:
            return self.authority.scope(context.invocation_metadata())
        except AuthError as exc:
            await context.abort(exc.code, exc.message)

    async def _queues(self, context, center: CallCenter, account: str | None,
                      name: str) -> list[str]:
        """The account's queue `name`, or all of them (name empty); NOT_FOUND otherwise."""
        if len(name) > MAX_NAME:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"queue: longer than {MAX_NAME} characters")
        mine = [n for n, qc in center.cfg.queues.items() if in_scope(account, qc.account)]
        if not name:
            return mine
        if name not in mine:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"queue: no queue {name!r}")
        return [name]

    async def QueueStats(self, request, context) -> ccp.QueueStatsResponse:
        account = await self._account(context)
        center = CallCenter.of(self.engine)
        names = await self._queues(context, center, account, request.queue)
        center.refresh()
        return ccp.QueueStatsResponse(queues=[queue_message(center.queue_stats(n))
                                              for n in names])

    async def ListAgents(self, request, context) -> ccp.ListAgentsResponse:
        account = await self._account(context)
        center = CallCenter.of(self.engine)
        names = await self._queues(context, center, account, request.queue)
        center.refresh()
        agents = dict.fromkeys(a for n in names for a in center.cfg.queues[n].agents)
        return ccp.ListAgentsResponse(agents=[agent_message(center.agent_info(center.agents[a]))
                                              for a in agents])

    async def SetAgentState(self, request, context) -> ccp.Agent:
        account = await self._account(context)
        center = CallCenter.of(self.engine)
        if not request.agent:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "agent: required")
        if len(request.agent) > MAX_NAME or len(request.state) > MAX_NAME:
            field = "agent" if len(request.agent) > MAX_NAME else "state"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{field}: longer than {MAX_NAME} characters")
        mine = set(center.agents) if account is None else \
            {a for qc in center.cfg.queues.values() if qc.account == account for a in qc.agents}
        if request.agent not in mine:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"agent: no agent {request.agent!r}")
        try:
            agent = center.set_agent_state(request.agent, request.state)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return agent_message(center.agent_info(agent))


__all__ = ["CallCenterService", "queue_message", "agent_message"]
