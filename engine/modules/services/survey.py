"""`baton.survey`: questions the caller answers with DTMF keys.

    [apps.feedback.nodes.survey]
    module = "baton.survey"
    outlets = { done = "hangup", incomplete = "hangup" }
    [apps.feedback.nodes.survey.params]
    name = "csat"                                  # the survey's name in results
    intro = "Please answer three short questions."
    outro = "Thank you for your answers. Goodbye."
    webhook_url = "https://crm.example.com/hooks/baton"
    webhook_secret = "a-secret-of-16-or-more-characters"
    questions = [
      { id = "resolved", say = "Was your problem solved? Press 1 for yes, 2 for no.", allowed = "12" },
      { id = "score", say = "From 0 to 10, how likely are you to recommend us? Then press pound.",
        min = 0, max = 10 },
      { id = "callback", play = "/srv/prompts/callback.wav", allowed = "12", required = false },
    ]

A question is said (`say`, text) or played (`play`, a WAV file). Its answer is
- one key of `allowed` (a string of keys), or one of `answers` (a list of strings);
- a whole number from `min` to `max`, keyed in and ended by `finish_on_key`
  (default `#`) or by reaching `max_digits` (default: the digits of `max`);
- else any keys up to `max_digits` (default 1).
A wrong answer gets `invalid_prompt` and the question again, no answer the question
again; after `retries` repeats (default 2) an optional question (`required = false`)
is skipped, a required one ends the survey as `incomplete`. `timeout`, `retries`,
`voice`, `language` and `invalid_prompt` may be set per question or for the node.

Results are stored per session in `DATA_DIR/services/survey.db` (readable with
the `Survey.Results` RPC), set in the session's params (`SurveyAnswers`,
`SurveyStatus`) and posted as a signed `survey.result` webhook (Baton's usual
signature, engine/common/webhooks.py) to `webhook_url`, else to the account's webhook.
The status is `completed` (then `outro` and the `done` outlet), `incomplete`
(the `incomplete` outlet) or `abandoned` (the caller hung up or control moved
away mid-survey).

Over texts (a number's `messaging` target, or a conversation handed to the
node) the same survey runs by message: `intro` and each question are texted
(a question's `text`, else its `say`, else its id), each text that comes back
is the answer (checked as keys would be, a trailing `finish_on_key` dropped),
`invalid_prompt` and the question again after a wrong one; no timeout (the
conversation's idle timeout ends it, `abandoned`); `outro` is texted at the end.
"""
from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from engine.modules.services.prompting import (KEYS, Prompter, PromptingModule, check_bool, check_common,
                        check_key_set, check_keys, check_number, check_prompt)

log = logging.getLogger("baton.modules.survey")

EVENT = "survey.result"
ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
MAX_QUESTIONS = 100
MAX_DIGITS = 32
NODE_KEYS = ("name", "questions", "intro", "intro_file", "outro", "outro_file", "invalid_prompt",
             "invalid_prompt_file", "webhook_url", "webhook_secret", "voice", "language",
             "timeout", "retries")
QUESTION_KEYS = ("id", "say", "play", "text", "allowed", "answers", "min", "max", "max_digits",
                 "finish_on_key", "required", "invalid_prompt", "invalid_prompt_file", "voice",
                 "language", "timeout", "retries")
DEFAULT_INVALID = "Sorry, that is not a valid answer."
MAX_TEXT = 1600             # characters of a question's `text` (ten carrier segments)


# -- the results store --------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL,
    account TEXT NOT NULL,
    survey TEXT NOT NULL,
    node TEXT NOT NULL,
    caller TEXT NOT NULL,
    number TEXT NOT NULL,
    status TEXT NOT NULL,
    started_wall_ns INTEGER NOT NULL,
    ended_wall_ns INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_session ON runs (account, session_id);
CREATE INDEX IF NOT EXISTS runs_survey ON runs (account, survey, started_wall_ns);
CREATE TABLE IF NOT EXISTS answers (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    position INTEGER NOT NULL,
    question TEXT NOT NULL,
    answer TEXT,
    attempts INTEGER NOT NULL,
    answered_wall_ns INTEGER NOT NULL,
    PRIMARY KEY (run_id, question)
);
"""


class SurveyStore:
    """Survey runs and their answers in SQLite (WAL: readers never wait).

    The engine writes through `submit`: one thread of the store's own runs
    the writes in order, off the event loop (a write, or a WAL checkpoint's
    fsync, never holds up the calls' media). Run ids are handed out in
    memory (`new_run_id`), so a call never waits for its insert."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        last = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM runs").fetchone()[0]
        seq = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'runs'").fetchone()
        self._next_id = max(int(last), int(seq[0]) if seq else 0) + 1
        self._writer: ThreadPoolExecutor | None = None

    def new_run_id(self) -> int:
        """A run id for `start(..., run_id=)`, never used before in this file."""
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            return rid

    def submit(self, fn, *args, **kwargs) -> Future:
        """Run `fn(*args, **kwargs)` on the store's thread, after everything
        submitted before; a failure is logged (and left in the Future)."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-survey")
        fut = self._writer.submit(fn, *args, **kwargs)
        fut.add_done_callback(_log_failure)
        return fut

    def start(self, session_id: str, account: str, survey: str, node: str, caller: str,
              number: str, run_id: int | None = None, started_wall_ns: int | None = None) -> int:
        started = time.time_ns() if started_wall_ns is None else started_wall_ns
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO runs (id, session_id, account, survey, node, caller, number, status, "
                "started_wall_ns) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?)",
                (run_id, session_id, account, survey, node, caller, number, started))
            if run_id is None:
                run_id = int(cur.lastrowid)
                self._next_id = max(self._next_id, run_id + 1)
            return run_id

    def answer(self, run_id: int, position: int, question: str, answer: str | None,
               attempts: int, answered_wall_ns: int | None = None) -> None:
        at = time.time_ns() if answered_wall_ns is None else answered_wall_ns
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                             (run_id, position, question, answer, attempts, at))

    def finish(self, run_id: int, status: str, ended_wall_ns: int | None = None) -> int:
        now = time.time_ns() if ended_wall_ns is None else ended_wall_ns
        with self._lock:
            self._db.execute("UPDATE runs SET status = ?, ended_wall_ns = ? WHERE id = ?",
                             (status, now, run_id))
        return now

    def results(self, account: str, session_id: str = "", survey: str = "",
                since_wall_ns: int = 0, limit: int = 100) -> list[dict]:
        """The account's runs (newest first) with their answers in question order."""
        sql = ("SELECT id, session_id, account, survey, node, caller, number, status, "
               "started_wall_ns, ended_wall_ns FROM runs WHERE account = ?")
        args: list = [account]
        if session_id:
            sql += " AND session_id = ?"
            args.append(session_id)
        if survey:
            sql += " AND survey = ?"
            args.append(survey)
        if since_wall_ns:
            sql += " AND started_wall_ns >= ?"
            args.append(since_wall_ns)
        sql += " ORDER BY started_wall_ns DESC, id DESC LIMIT ?"
        args.append(limit)
        keys = ("run_id", "session_id", "account", "survey", "node", "caller", "number", "status",
                "started_wall_ns", "ended_wall_ns")
        with self._lock:
            runs = [dict(zip(keys, r)) for r in self._db.execute(sql, args).fetchall()]
            for run in runs:
                run["answers"] = [
                    {"question": q, "answer": a, "attempts": n, "answered_wall_ns": t}
                    for q, a, n, t in self._db.execute(
                        "SELECT question, answer, attempts, answered_wall_ns FROM answers "
                        "WHERE run_id = ? ORDER BY position", (run["run_id"],)).fetchall()]
        return runs

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)      # the writes queued so far land first
            self._writer = None
        with self._lock:
            self._db.close()


def _log_failure(fut: Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("survey store: %s", fut.exception())


def store_for(engine) -> SurveyStore:
    """The engine's survey store (opened on first use)."""
    store = getattr(engine, "survey_store", None)
    if store is None:
        store = SurveyStore(os.path.join(engine.cfg.data_dir, "services", "survey.db"))
        engine.survey_store = store
    return store


def caller_uri(from_header: str | None) -> str:
    """The URI of a From header, without display name or tag."""
    h = (from_header or "").strip()
    if "<" in h:
        return h[h.find("<") + 1:].split(">", 1)[0]
    return h.split(";", 1)[0]


# -- the module ---------------------------------------------------------------------------

class SurveyState(Prompter):
    def __init__(self, ctl):
        super().__init__(ctl)
        self.run_id = 0
        self.index = 0
        self.tries = 0
        self.answers: dict = {}
        self.finished = False


class SurveyTexts:
    """A survey run over a text conversation: no media, the answers come as texts."""

    def __init__(self):
        self.run_id = 0
        self.index = 0
        self.tries = 0
        self.answers: dict = {}
        self.finished = False
        self.asked = False      # the first question is out: texts from now on are answers


class SurveyModule(PromptingModule):
    code = "baton.survey"
    level = "service"
    texting = True              # runs over text conversations too (on_text)
    outlets = ("done", "incomplete")

    @classmethod
    def check_params(cls, params: dict) -> None:
        check_keys(params, NODE_KEYS)
        check_common(params)
        check_prompt(params, text="intro", file="intro_file")
        check_prompt(params, text="outro", file="outro_file")
        check_prompt(params, text="invalid_prompt", file="invalid_prompt_file")
        name = params.get("name")
        if name is not None and (not isinstance(name, str) or not ID.match(name)):
            raise ValueError(f"name: letters, digits, _ . - (up to 64), not {name!r}")
        url = params.get("webhook_url")
        if url is not None:
            from urllib.parse import urlsplit

            if not isinstance(url, str) or not url.startswith(("http://", "https://")) or \
                    not urlsplit(url).hostname:
                raise ValueError(f"webhook_url: an http:// or https:// URL, not {url!r}")
            if "webhook_secret" not in params:
                raise ValueError("webhook_secret: required with webhook_url (results are signed)")
        secret = params.get("webhook_secret")
        if secret is not None and (not isinstance(secret, str) or len(secret) < 16):
            raise ValueError("webhook_secret: a string of at least 16 characters")
        questions = params.get("questions")
        if not isinstance(questions, list) or not questions:
            raise ValueError("questions: a list of questions is required, e.g. "
                             "[{ id = \"q1\", say = \"Press 1 or 2.\", allowed = \"12\" }]")
        if len(questions) > MAX_QUESTIONS:
            raise ValueError(f"questions: more than {MAX_QUESTIONS}")
        seen = set()
        for i, q in enumerate(questions):
            where = f"questions.{i}."
            if not isinstance(q, dict):
                raise ValueError(f"questions.{i}: expected a table")
            check_keys(q, QUESTION_KEYS, where)
            qid = q.get("id")
            if not isinstance(qid, str) or not ID.match(qid):
                raise ValueError(f"{where}id: required: letters, digits, _ . - (up to 64)")
            if qid in seen:
                raise ValueError(f"{where}id: {qid!r} is used twice")
            seen.add(qid)
            check_prompt(q, where, required=True, text="say", file="play")
            text = q.get("text")
            if text is not None and (not isinstance(text, str) or not text.strip()
                                     or len(text) > MAX_TEXT):
                raise ValueError(f"{where}text: the question as texted, 1 to {MAX_TEXT} "
                                 f"characters")
            check_prompt(q, where, text="invalid_prompt", file="invalid_prompt_file")
            check_common(q, where)
            check_bool(q, "required", where)
            check_key_set(q, "allowed", where)
            check_key_set(q, "finish_on_key", where, allow_empty=True)
            check_number(q, "max_digits", 1, MAX_DIGITS, where, integer=True)
            check_number(q, "min", 0, 10 ** 9, where, integer=True)
            check_number(q, "max", 0, 10 ** 9, where, integer=True)
            kinds = [k for k in ("allowed", "answers", "min") if k in q]
            if "max" in q and "min" not in q:
                raise ValueError(f"{where}min: required with max")
            if "min" in q and "max" not in q:
                raise ValueError(f"{where}max: required with min")
            if len(kinds) > 1:
                raise ValueError(f"{where}{kinds[1]}: give one of allowed, answers or min/max")
            if "min" in q and q["min"] > q["max"]:
                raise ValueError(f"{where}max: smaller than min")
            if "answers" in q:
                a = q["answers"]
                if not isinstance(a, list) or not a or not all(
                        isinstance(x, str) and x and len(x) <= MAX_DIGITS and
                        all(c in KEYS for c in x) for x in a):
                    raise ValueError(f"{where}answers: a list of key strings such as [\"1\", \"10\"]")
            finish = q.get("finish_on_key", "#" if cls._max_digits(q) > 1 else "")
            for x in list(q.get("allowed", "")) + list(q.get("answers", [])):
                if finish and any(c in finish for c in x):
                    raise ValueError(f"{where}finish_on_key: {finish!r} is also an answer key")
            if "max_digits" in q and "allowed" in q and q["max_digits"] != 1:
                raise ValueError(f"{where}max_digits: an `allowed` answer is one key")
            if "max_digits" in q and "min" in q and q["max_digits"] < len(str(q["max"])):
                raise ValueError(f"{where}max_digits: {q['max']} has more digits")

    # -- the calls ----------------------------------------------------------------
    def take(self, ctl) -> None:
        texts = ctl.session.kind == "messaging"
        state = SurveyTexts() if texts else self.begin(ctl, SurveyState)
        if state is None:
            return
        ctl.state = state
        session = ctl.session
        try:
            store = store_for(ctl.engine)
            state.run_id = store.new_run_id()
            store.submit(store.start, session.id, session.account, self._name(ctl),
                         ctl.node.name, caller_uri(session.from_uri), session.number or "",
                         run_id=state.run_id, started_wall_ns=time.time_ns())
        except sqlite3.Error as exc:
            log.error("session %s: survey store: %s", session.id, exc)
            state.run_id = 0
        session.params["SurveyStatus"] = "running"
        p = ctl.params
        intro = (p.get("intro"), p.get("intro_file"))
        prefix = None if intro == (None, None) else intro
        if texts:
            # The text that started the conversation (or handed it here) reaches
            # on_text right after take: it is no answer. Ask once it has passed.
            ctl.engine.loop.call_soon(lambda: ctl.active and self._ask(ctl, prefix))
            return
        self._ask(ctl, prefix)

    @staticmethod
    def _name(ctl) -> str:
        return str(ctl.params.get("name") or ctl.node.name)

    @staticmethod
    def _max_digits(q: dict) -> int:
        if "max_digits" in q:
            return int(q["max_digits"])
        if "answers" in q:
            return max(len(a) for a in q["answers"])
        if "max" in q:
            return len(str(q["max"]))
        return 1

    def _ask(self, ctl, prefix=None) -> None:
        state = ctl.state
        q = ctl.params["questions"][state.index]
        state.tries += 1
        if isinstance(state, SurveyTexts):
            state.asked = True
            self._text(ctl, [prefix[0] if prefix else None,
                             q.get("text") or q.get("say") or q["id"]])
            return
        parts = [prefix] if prefix is not None else []
        parts.append((q.get("say"), q.get("play")))
        n = self._max_digits(q)
        finish = q.get("finish_on_key", "#") if n > 1 else q.get("finish_on_key", "")
        state.ask(parts, lambda digits, why: self._answer(ctl, digits, why), max_digits=n,
                  finish_on_key=finish, timeout=float(self.opt(ctl, q, "timeout", 5)),
                  voice=self.opt(ctl, q, "voice", "en"), language=self.opt(ctl, q, "language"))

    @staticmethod
    def _text(ctl, lines) -> None:
        body = "\n".join(x for x in lines if x)
        if body:
            ctl.engine.messaging.send(ctl.session, body)

    def on_text(self, ctl, message) -> None:
        """A text of the conversation: the answer to the question asked."""
        state = ctl.state
        if not isinstance(state, SurveyTexts) or state.finished or not state.asked:
            return
        q = ctl.params["questions"][state.index]
        answer = message.body.strip()
        finish = q.get("finish_on_key", "#") if self._max_digits(q) > 1 else ""
        if finish and answer[-1:] in finish:
            answer = answer[:-1].rstrip()
        self._answer(ctl, answer, "text")

    @staticmethod
    def valid(q: dict, digits: str) -> bool:
        """Whether `digits` answers question `q`."""
        if not digits:
            return False
        if "allowed" in q:
            return len(digits) == 1 and digits in q["allowed"]
        if "answers" in q:
            return digits in q["answers"]
        if "min" in q:
            return digits.isdigit() and q["min"] <= int(digits) <= q["max"]
        return True

    def _answer(self, ctl, digits: str, why: str) -> None:
        state = ctl.state
        questions = ctl.params["questions"]
        q = questions[state.index]
        if self.valid(q, digits):
            self._record(ctl, q, digits)
            return
        if state.tries > int(self.opt(ctl, q, "retries", 2)):
            if q.get("required", True):
                self._finish(ctl, "incomplete")
            else:
                self._record(ctl, q, None)
            return
        prefix = None
        if digits:
            prefix = (self.opt(ctl, q, "invalid_prompt"), self.opt(ctl, q, "invalid_prompt_file"))
            if prefix == (None, None):
                prefix = (DEFAULT_INVALID, None)
        self._ask(ctl, prefix)

    def _record(self, ctl, q: dict, answer: str | None) -> None:
        state = ctl.state
        state.answers[q["id"]] = answer
        ctl.session.params["SurveyAnswers"] = dict(state.answers)
        if state.run_id:
            store = store_for(ctl.engine)
            store.submit(store.answer, state.run_id, state.index, q["id"], answer, state.tries,
                         time.time_ns())
        state.index += 1
        state.tries = 0
        if state.index >= len(ctl.params["questions"]):
            self._finish(ctl, "completed")
        else:
            self._ask(ctl)

    def _finish(self, ctl, status: str) -> None:
        state = ctl.state
        self._report(ctl, state, status)
        if status != "completed":
            ctl.release("incomplete", SurveyStatus=status)
            return
        p = ctl.params
        outro = (p.get("outro"), p.get("outro_file"))
        if isinstance(state, SurveyTexts):
            self._text(ctl, [outro[0]])
            ctl.release("done", SurveyStatus=status)
            return
        if outro == (None, None):
            ctl.release("done", SurveyStatus=status)
            return
        state.say([outro], lambda *_: ctl.release("done", SurveyStatus=status),
                  voice=p.get("voice", "en"), language=p.get("language"))

    def _report(self, ctl, state: SurveyState, status: str) -> None:
        """Store the outcome and post it (once per run)."""
        if state.finished:
            return
        state.finished = True
        session = ctl.session
        engine = ctl.engine
        session.params["SurveyStatus"] = status
        ended = time.time_ns()
        if state.run_id:
            store = store_for(engine)
            store.submit(store.finish, state.run_id, status, ended)
        payload = {"session_id": session.id, "account": session.account,
                   "survey": self._name(ctl), "node": ctl.node.name, "run_id": state.run_id,
                   "status": status, "caller": caller_uri(session.from_uri),
                   "number": session.number or "",
                   "answers": [{"question": q["id"], "answer": state.answers.get(q["id"])}
                               for q in ctl.params["questions"] if q["id"] in state.answers],
                   "ended_wall_ns": ended}
        if engine.listeners:
            engine.notify(session, EVENT, payload)
        hooks = getattr(engine, "webhooks", None)
        if hooks is None:
            return
        url, secret = ctl.params.get("webhook_url"), ctl.params.get("webhook_secret")
        if not url:
            url, secret = hooks.settings.destination(session.account)
        if not url:
            return
        try:
            hooks.send(EVENT, payload, url=url, secret=secret, account=session.account)
        except ValueError as exc:
            log.warning("session %s: survey webhook not sent: %s", session.id, exc)

    def revoke(self, ctl, reason: str) -> None:
        super().revoke(ctl, reason)
        state = ctl.state
        if isinstance(state, (SurveyState, SurveyTexts)) and not state.finished:
            self._report(ctl, state, "abandoned")


__all__ = ["SurveyModule", "SurveyStore", "store_for"]
