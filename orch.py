#!/usr/bin/env python3
"""orch: run a fleet of AI coding agents in tmux, and do not trust them.

A lead session spawns N interactive agent workers in tmux panes, writes each a
brief, lets them coordinate through a plain-file bus, watches their screens,
nudges the ones that drift, and has different workers adversarially verify each
other's findings before anything is reported.

usage: python3 orch.py <command> [args]      (orch <command> after `install`)

commands: (written out from COMMANDS, at the end of this file)

agents (--agent or ORCH_AGENT): claude (default), codex, gemini, aider, sim,
  or any command line; words after a known name are passed to it ("sim --lie 2").
worker states: booting dialog idle draft busy permission limited stalled
  unknown exited done
exit codes: 0 ok, 1 operation failed, 2 bad usage, 3 wait timed out,
  4 a worker exited without its done flag, 5 over --budget, 6 a worker needs the
  lead (wait --attention), 130 interrupted
environment: ORCH_HOME (default ~/.orch), ORCH_AGENT, ORCH_DEBUG=1 (show
  tracebacks)
"""
import argparse
import collections
import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import sys
import time
# Each command imports the rest where it needs them: a start pays only for what it uses.


# --- constants -----------------------------------------------------------------

VERSION = "0.3"
SCHEMA = 1                      # fleet.json "version"
ORCH = os.path.abspath(sys._getframe().f_code.co_filename)    # orch.py, also run from its compiled copy
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}\Z"   # a fleet's name (patterns compile at first use)
PAST_BOOT = ("idle", "busy", "draft")   # past booting and dialogs (a draft is typed text)
BOOT_WAIT = 60.0                # seconds spawn/send wait for a booting worker
SETTLE = 2.0                    # seconds a ready screen must hold before a new worker counts as ready
ANSWER_TRIES = 3                # times spawn answers a dialog it may answer that still shows
ENTER_RETRIES = 3               # Enters after the first while the text still sits in the box
CONTEXT_HIGH = 85.0             # context use (%) at which status says: hand the work on
STALL = 120.0                   # seconds of an unchanged screen before a worker counts as stalled
STALE = 30.0                    # seconds after which a working worker's cost and context are shown as old
READ_CAP = 16 << 20             # bytes orch reads of any file a worker can write
BUS_LINE = 2000                 # characters of one outbox line the bus keeps
MERGE_CAP = 1000                # outbox lines of one worker one merge takes
FINDINGS_CAP = 1000             # findings of one worker that verify collects; the rest are named
SPLITS_CAP = 32                 # readings of a claim and quote cut at a '|' the citation check tries
# Characters no worker text carries raw to a pane or a terminal: C0 controls but
# newline and tab, DEL, C1; and, where a person reads, the bidi controls too.
CONTROLS = "\x00-\x08\x0b-\x1f\x7f-\x9f"
BIDI = "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
# Characters that show nothing, or hide text: zero-width ones, word joiners and
# invisible operators, BOM, soft hyphen, line and paragraph separators, Hangul
# fillers, variation selectors, tag characters (a whole hidden sentence).
INVISIBLE = "\u00ad\u034f\u115f\u1160\u180e\u200b-\u200d\u2028\u2029\u2060-\u2064\u2800\u3164\ufe00-\ufe0f\ufeff" \
            "\uffa0\U000e0000-\U000e007f\U000e0100-\U000e01ef"

# Keys that clear a draft, the same for every agent: end of line, kill to line
# start (C-u in Claude, Codex, Gemini, prompt_toolkit), join the previous line;
# delivery repeats them while the draft lasts. Not Escape: it interrupts a busy
# turn in all three, answers "No" in approvals, and Esc Esc opens Claude's
# rewind. Not C-c: one Ctrl-C on an empty Codex 0.169 composer exits; Claude
# and Gemini exit on the second.
CLEAR_KEYS = ["C-e", "C-u", "BSpace"]


class OrchError(Exception):
    """The one failure: a message for the user, an exit code, for tmux failures
    a kind ("server" gone, "target" gone) callers turn into states, and the
    lines of what did succeed before it (main prints them first); a failed
    tmux batch also carries what its commands before the failure printed."""

    def __init__(self, message, code=1, kind=None, said=(), output=""):
        super().__init__(message)
        self.code = code
        self.kind = kind
        self.said = list(said)
        self.output = output


# --- records -------------------------------------------------------------------
# What passes between functions in memory, each field said once. A fleet is the
# dict of fleet.json, and what orch writes as JSON is built from these at the door.

# One pane of a snapshot: its %id, whether its program has exited, orch's tag on
# it ("<fleet id>:<n>"), the title its program set, and its screen.
Capture = collections.namedtuple("Capture", "pane dead tag title screen")

# What a worker's status line last said: cost (USD) and context use (%), None when
# unknown (not Claude, not reported yet): never guessed; and when it said it (epoch s).
Telemetry = collections.namedtuple("Telemetry", "cost_usd context_pct reported")

# Worker n as one poll saw it, in pane `pane`. shows: the state its pane shows,
# which delivery must respect (a done worker can still sit at a prompt, or be
# dead); state: what status and wait report ("done" once its flag exists,
# "stalled" when a ready screen has not moved for --stall); done: its flag
# exists; quiet: seconds since its screen changed (None: not live); last: its
# lowest non-blank line; screen: its text, no escapes; digest: a hash of that
# text; resets: when its usage limit resets (epoch s, None: unknown); cost_usd,
# context_pct, reported: its Telemetry; foreign: [(owner, path)] of files of others its
# agent wrote (owner 0: orch's).
Row = collections.namedtuple("Row", "n pane shows state done quiet last screen digest resets "
                                    "cost_usd context_pct reported foreign")

# One thing `wait` reports: kind "state" (worker n's state changed: its Row and
# its state before), "done" (its done flag), "bus" (a line to the lead), "foreign"
# (a write into a file of another worker's), "budget"; text: what the line says
# (bus, foreign, budget); why and command: set when it needs the lead.
Event = collections.namedtuple("Event", "kind n row was text why command")

# One fleet of ORCH_HOME for `status`: its name, whether its session is live,
# its worker count, how many are done, its agent and workdir; or, for a fleet
# whose fleet.json cannot be read, only name, live (False) and the error.
Summary = collections.namedtuple("Summary", "name live workers done agent workdir error")

# One line of the bus: the byte offset it starts at in bus.md, whether orch
# wrote it there (genuine), and its text as written.
Post = collections.namedtuple("Post", "at genuine text")


class Record(object):
    """A record whose fields are its __slots__, documented where it is defined,
    made by keyword; a field not given is None."""
    __slots__ = ()

    def __init__(self, **fields):
        for name in self.__slots__:
            setattr(self, name, fields.pop(name, None))
        if fields:
            raise TypeError("%s has no field %s" % (type(self).__name__, ", ".join(fields)))

    def json(self, *names, **more):
        """The fields `names`, and `more`, as a dict for JSON."""
        out = {name: getattr(self, name) for name in names}
        out.update(more)
        return out


class Finding(Record):
    """F<k> of worker `worker` (id W<n>.F<k>): a claim about path:line-end (path
    None: not about one place) and the quote said to lie there. `rest` is the
    text after the location as written: a '|' in it may belong to the claim or
    to the quote, so the citation check tries each split (splits()). Once
    verified: citation (what that check said), rounds (its Verdicts, in the
    order they were asked for) and final (its FINALS word). finders: every
    worker that reported it (the same place and quote: one finding), `also`
    their ids but its own; canary: for a finding orch planted, known false,
    the id of the real finding whose claim it borrows (None: a real one).
    change: for a write fleet's change (id W<n>.C: "this change does what its
    author was asked and breaks nothing"), what orch knows of it (a dict:
    commit, diff, Change fields, scope, check); its citation is then "n/a",
    or the final word it earned before any verifier (OUT-OF-SCOPE, BREAKS-CHECK)."""
    __slots__ = ("worker", "k", "path", "line", "end", "claim", "quote", "rest", "citation", "rounds",
                 "final", "finders", "also", "canary", "change")
    HEAD, FIRST = "claim", 1            # its cells: a claim of one cell at least, then the quote

    @property
    def id(self):
        return "W%d.C" % self.worker if self.change else "W%d.F%d" % (self.worker, self.k)

    def matrix_json(self):
        if self.canary:
            return self.json("path", "line", "claim", "quote", id=self.id, borrowed_from=self.canary,
                             rounds=[v.matrix_json() for v in self.rounds or []])
        return self.json("path", "line", "end", "worker", "k", "claim", "quote", id=self.id, rounds=[
            v.matrix_json() for v in self.rounds or []], citation=self.citation, final=self.final,
            found_by=self.finders or [self.worker], **({"change": self.change} if self.change else {}))


class Verdict(Record):
    """One verdict on a finding: CONFIRMED, REFUTED, UNVERIFIABLE, or MISSING
    (none given), written at `at` (file:line). Its evidence is the place
    path:line-end the verifier read, the `why` and the quote from there, with
    `rest` as for a Finding; `evidence` is its text after the verdict word (the
    old grammar gave only that). Once counted: round, verifier, check ("checked",
    "unsupported", "missing", "fabricated: ..." or "not W<v>'s: ..."), counts
    (it is one of the votes), why_not (why it is not, "" if it is), forged
    (why its round file is not its verifier's, None if it is) and family (the
    verifier's agent)."""
    __slots__ = ("verdict", "path", "line", "end", "why", "quote", "rest", "at", "evidence", "round",
                 "verifier", "check", "counts", "why_not", "forged", "family")
    HEAD, FIRST = "why", 0              # its cells: a why that may be left out, then the quote

    def matrix_json(self):
        out = self.json("path", "line", "end", "verdict", "why", "quote", "at", "evidence", "round", "verifier",
                        "family", "check", unsupported=self.check != "checked", counts=self.counts,
                        why_not=self.why_not)
        if self.forged:
            out["forged"] = self.forged
        return out


# What one verification round gave: {verifier: {finding id: Verdict}} from each
# verifier reached, why the round is incomplete (lines, also in problems), and
# {verifier: digests of its round file and done flag as orch read them}.
RoundOutcome = collections.namedtuple("RoundOutcome", "verdicts incomplete digests")

# How far one worker's word held, as finder and as verifier (counts), and
# whether it was dropped for fabricated evidence.
RELIABILITY = ("findings", "bad_citations", "refuted", "confirmed", "disputed", "verdicts", "decisive",
               "unsupported", "missing", "fabricated", "outvoted", "canaries_confirmed")
Reliability = collections.namedtuple("Reliability", RELIABILITY + ("dropped",))

# A verification's outcome, as matrix.json holds it: the fleet, how many rounds
# ran, the verdicts each finding needed, the verifier pool, the Findings, the
# tally {FINALS word: count}, {dropped verifier: why}, {worker: Reliability},
# why it is incomplete, the findings left undecided by that, problems met, when,
# and the canaries planted (Findings orch knows false, with the verdicts on them).
Matrix = collections.namedtuple("Matrix", "fleet rounds need pool findings tally dropped reliability "
                                          "incomplete undecided problems written canaries")


# --- agents ------------------------------------------------------------------

# Each agent's setup hooks. "seed" runs once per fleet in the lead, before any
# pane starts (workers booting together must not race to write one config), so
# workers boot past first-run dialogs and the user's own config is never
# touched; "setup" runs in the pane and returns the worker's env and extra args.

def claude_user_dir():
    return os.environ.get("CLAUDE_CONFIG_DIR") or os.path.expanduser("~/.claude")


def skill_dir():
    """Where the lead's Claude Code reads the orch skill: $CLAUDE_CONFIG_DIR/skills
    when that is set (then ~/.claude/skills is not read), else ~/.claude/skills."""
    return os.path.join(claude_user_dir(), "skills", "orch")


def credentials(names, *path):
    """Where a worker gets its login from (the first variable of `names` that
    is set, else the file at `path` if it exists), or None: for doctor."""
    found = next((c for c in names if os.environ.get(c)), None)
    return found or (os.path.join(*path) if os.path.exists(os.path.join(*path)) else None)


# What a worker runs without a prompt, for every agent that asks before shell
# commands: enough to read files, post to the bus and touch its done flag (not
# find: -delete and -exec would pass as a prefix; rm is denied, never asked).
WORKER_COMMANDS = ("touch", "echo", "cat", "ls", "grep", "head", "tail", "wc",
                   "git status", "git diff", "git log", "git show")
# And what a write fleet's worker also runs, to commit in its worktree: never
# push, reset --hard, clean, checkout or branch, which reach past its change.
COMMIT_COMMANDS = ("git add", "git commit", "git rm", "git mv")


def worker_commands(fleet):
    return WORKER_COMMANDS + COMMIT_COMMANDS * bool(fleet.get("git"))


def claude_seed(fleet, agent):
    import shlex
    config = os.path.join(fleet["run"], "claude")
    if os.path.exists(os.path.join(config, ".claude.json")):
        return
    os.makedirs(config, exist_ok=True)
    user_dir = claude_user_dir()
    mine = {}
    with contextlib.suppress(OSError, ValueError, RecursionError):     # the user's own: whole, past 16 MB too
        with open(os.path.join(user_dir, ".claude.json") if os.environ.get("CLAUDE_CONFIG_DIR")
                  else os.path.expanduser("~/.claude.json"), encoding="utf-8") as f:
            mine = json.load(f)
    mine = mine if isinstance(mine, dict) else {}
    keep = ("oauthAccount", "userID", "theme", "lastOnboardingVersion", "customApiKeyResponses")
    state = {k: mine[k] for k in keep if k in mine}
    trusted = {"hasTrustDialogAccepted": True, "allowedTools": []}
    workdir, shared = os.path.realpath(fleet["workdir"]), os.path.realpath(shared_dir(fleet))
    state.update(hasCompletedOnboarding=True, projects={workdir: trusted, shared: trusted},
                 # Claude Code 2.1.331: auto-mode notices that would block a worker.
                 hasSeenAutoDefaultNotice=True, hasSeenAutoDefaultNudge=True,
                 autoModeClassifierBillingNoticeAcknowledgedAt=4102444800000)
    state.setdefault("lastOnboardingVersion", "2.1.331")
    key = os.environ.get("ANTHROPIC_API_KEY")
    if key:                                 # else Claude asks whether to use the key
        approved = state.setdefault("customApiKeyResponses", {"approved": [], "rejected": []})
        approved.setdefault("approved", []).append(key[-20:])
    write_json(os.path.join(config, ".claude.json"), state)
    # acceptEdits lets a worker edit the workdir and its own folder (claude_setup);
    # these rules add the commands it needs. rm is denied, not asked: a refusal does not stall a worker.
    rules = ["Bash(%s:*)" % c for c in worker_commands(fleet)]
    settings = {"permissions": {"allow": rules, "deny": ["Bash(rm:*)"]}}
    if "--dangerously-skip-permissions" in shlex.split(agent):     # the lead asked for it
        settings["skipDangerousModePermissionPrompt"] = True
    # The hooks and the status line are orch itself (`orch hook`): events, cost and context.
    # `|| true`: a hook that exits 2 (python3 on a moved orch.py) would block every prompt.
    hook = {"type": "command", "command": " ".join(shlex.quote(x) for x in own_argv() + ["hook"]) + " || true"}
    # refreshInterval (s, Claude Code 2.1.97+): the status line runs again a few seconds after a turn's
    # last update too, so a worker's cost and context are never those of before its final turn.
    settings.update(hooks={e: [{"hooks": [hook]}] for e in CLAUDE_HOOKS}, statusLine=dict(hook, refreshInterval=3))
    write_json(os.path.join(config, "settings.json"), settings)
    creds = os.path.join(user_dir, ".credentials.json")
    if os.path.exists(creds):               # a link, so token refreshes keep working
        os.symlink(creds, os.path.join(config, ".credentials.json"))


def claude_setup(fleet, w):
    """A config dir of the worker's own, from the fleet's seed: its Edit rule
    covers its own folder only."""
    import glob
    import shlex
    seed, config = os.path.join(fleet["run"], "claude"), own_dir(os.path.join(state_dir(fleet, w["n"]), "claude"))
    if not os.path.exists(os.path.join(config, ".claude.json")):
        settings = read_state(os.path.join(seed, "settings.json"))
        settings.setdefault("permissions", {}).setdefault("allow", []).insert(
            0, "Edit(/%s/**)" % os.path.realpath(worker_dir(fleet, w["n"])))
        write_json(os.path.join(config, "settings.json"), settings)
        with contextlib.suppress(OSError):
            os.symlink(os.readlink(os.path.join(seed, ".credentials.json")), os.path.join(config, ".credentials.json"))
        state = read_state(os.path.join(seed, ".claude.json"))
        state.setdefault("projects", {})[os.path.realpath(workdir_of(fleet, w["n"]))] = {
            "hasTrustDialogAccepted": True, "allowedTools": []}       # its worktree, in a write fleet
        write_json(os.path.join(config, ".claude.json"), state)
    resume = glob.glob(os.path.join(glob.escape(config), "projects", "*", w["session_id"] + ".jsonl"))
    args = ["--add-dir", os.path.realpath(shared_dir(fleet)),
            "--resume" if resume else "--session-id", w["session_id"]]
    if not any(x in shlex.split(w["agent"]) for x in ("--permission-mode", "--dangerously-skip-permissions")):
        args = ["--permission-mode", "acceptEdits"] + args
    return {"env": {"CLAUDE_CONFIG_DIR": config, "DISABLE_AUTOUPDATER": "1",
                    # pin the inline UI the screen markers know (2.1.331 may pick fullscreen)
                    "CLAUDE_CODE_DISABLE_ALTERNATE_SCREEN": "1"}, "args": args}


def codex_setup(fleet, w):
    """Codex 0.169 keeps trust in config.toml: each worker gets a CODEX_HOME of
    its own with the user's config, the workdir trusted, and a link to the login.
    Its own, as `resume --last` takes a home's newest session of the cwd (which
    all workers share): a respawn resumes the worker's own, once it has one."""
    import glob
    import shlex
    home = own_dir(os.path.join(state_dir(fleet, w["n"]), "codex"))
    user = os.environ.get("CODEX_HOME") or os.path.expanduser("~/.codex")
    if not os.path.exists(os.path.join(home, "config.toml")):
        text = read_text(os.path.join(user, "config.toml"), "")
        table = "[projects.%s]" % json.dumps(os.path.realpath(workdir_of(fleet, w["n"])))
        if table not in text:               # the user may have trusted it already
            text += "\n%s\ntrust_level = \"trusted\"\n" % table
        write_file(os.path.join(home, "config.toml"), text)
        if os.path.exists(os.path.join(user, "auth.json")):
            os.symlink(os.path.join(user, "auth.json"), os.path.join(home, "auth.json"))
    # 0.171 writes sessions/YYYY/MM/DD/rollout-<time>-<uuid>.jsonl at the first message.
    # --add-dir: its sandbox lets a worker write only the workdir, /tmp and its folder; --no-alt-screen keeps
    # the conversation in the pane's scrollback (logs/); --no-daemon: no app-server outlives kill.
    # In orch's sandbox Codex's own cannot start (its bwrap makes mount points in the workdir,
    # read-only there): orch's is the one that holds, unless the lead chose a mode.
    resume = glob.glob(os.path.join(glob.escape(home), "sessions", "*", "*", "*", "rollout-*.jsonl"))
    words = shlex.split(w["agent"])
    own = ["--sandbox", "danger-full-access"] if fleet.get("isolate") and not any(
        x in ("-s", "--sandbox", "--full-auto", "--dangerously-bypass-approvals-and-sandbox") or x.startswith("--sandbox=")
        for x in words) else []
    return {"env": {"CODEX_HOME": home}, "args": ["resume", "--last"] * bool(resume) + own + [
        "--add-dir", os.path.realpath(worker_dir(fleet, w["n"])), "--no-alt-screen", "--no-daemon"]}


GEMINI_POLICY = """# orch: what the workers of this fleet run without a prompt (Gemini CLI policy
# engine, loaded with --policy at the user tier). rm is denied, not asked.
[[rule]]
toolName = "run_shell_command"
commandPrefix = %s
decision = "allow"
priority = 100

[[rule]]
toolName = "run_shell_command"
commandPrefix = "rm"
decision = "deny"
priority = 200
denyMessage = "orch: workers do not delete files"
"""


def gemini_seed(fleet, agent):
    """Gemini 0.61 asks on every start whether to trust an --include-directories
    folder, unless a trusted-folders file (the fleet's own) names it; and before
    every shell command, unless a policy (the fleet's own) allows it."""
    write_json(os.path.join(fleet["run"], "gemini-trusted.json"), {
        os.path.realpath(p): "TRUST_FOLDER" for p in [fleet["workdir"], shared_dir(fleet)] + [
            os.path.join(fleet["run"], "worktrees")] * bool(fleet.get("git"))})     # a write fleet's worktrees
    write_file(os.path.join(fleet["run"], "gemini-policy.toml"),
               GEMINI_POLICY % json.dumps(list(worker_commands(fleet))))


def gemini_setup(fleet, w):
    """A home of the worker's own (GEMINI_CLI_HOME: Gemini writes its history
    and chats under ~/.gemini) with the user's settings and a link to the
    login; the fleet's policy, beside the user's own (a --policy replaces
    ~/.gemini/policies), and auto_edit unless the lead chose a mode: like
    Claude's acceptEdits, write_file and replace within the workdir and shared
    dir, and an allowed command may redirect (`echo ... >> bus.md`)."""
    import shlex
    user = os.path.join(os.environ.get("GEMINI_CLI_HOME") or os.path.expanduser("~"), ".gemini")
    home = own_dir(os.path.join(state_dir(fleet, w["n"]), "gemini"))
    if not os.path.isdir(os.path.join(home, ".gemini")) or os.path.islink(os.path.join(home, ".gemini")):
        own_dir(os.path.join(home, ".gemini"))
        write_file(os.path.join(home, ".gemini", "settings.json"), read_text(os.path.join(user, "settings.json"), "{}"))
        for name in ("oauth_creds.json", "google_accounts.json"):     # links: a refreshed login reaches all
            if os.path.exists(os.path.join(user, name)):
                os.symlink(os.path.join(user, name), os.path.join(home, ".gemini", name))
    mine = os.path.join(user, "policies")
    args = ["--include-directories", os.path.realpath(shared_dir(fleet))]
    args += ["--policy", mine] if os.path.isdir(mine) else []
    args += ["--policy", os.path.join(fleet["run"], "gemini-policy.toml")]
    words = shlex.split(w["agent"])
    if not any(x in ("-y", "--yolo", "--approval-mode") or x.startswith("--approval-mode=") for x in words):
        args += ["--approval-mode", "auto_edit"]
    # CI=true or GITHUB_ACTIONS=true (a lead in CI) make it headless: it exits.
    return {"env": {"GEMINI_CLI_TRUST_WORKSPACE": "true", "CI": None, "GITHUB_ACTIONS": None, "GEMINI_CLI_HOME": home,
                    "GEMINI_CLI_TRUSTED_FOLDERS_PATH": os.path.join(fleet["run"], "gemini-trusted.json")},
            "args": args}


def aider_setup(fleet, w):
    """aider keeps its history in the git root, the workdir (read-only in a
    sandbox): the worker's own state dir instead."""
    state = state_dir(fleet, w["n"])
    return {"env": {"AIDER_INPUT_HISTORY_FILE": os.path.join(state, "aider.input.history"),
                    "AIDER_CHAT_HISTORY_FILE": os.path.join(state, "aider.chat.history.md")}}


# Agents: everything orch knows about each, one entry per agent. Screen facts
# from real tmux 3.3a captures of Claude Code 2.1.197, Codex 0.169.0 and Gemini
# CLI 0.61.0, plus strings users reported for other versions.
#   install, credentials, login: doctor's hint, where the login is found, and
#     how to log in; seed, setup: the hooks above; command: orch's own command
#     that runs in place of the agent word (else the word itself runs).
#   Markers are regexes searched (re.M) in the screen without escapes; "prompt"
#     in the screen without dim text. "above": rows over the input line that
#     still belong to the live UI (spinner, status); "below": rows allowed under
#     it (None: any; 0: a line REPL, whose older prompt lines are only history).
#   "answer": dialogs spawn may answer by itself (ANSWER_TRIES): only "trust the
#     workdir the lead chose" and "keep the model the user configured".
#     "settle": seconds a ready screen must hold (SETTLE).
#     "queue_key": what submits to a busy agent without interrupting its turn.
#     "above_only": rows drawn only above the input line; one below a prompt line
#     means that line is not the input line (a frame caught mid-redraw).
#   "login_screen": a dialog that asks for a login: no wait ends it, the lead must log in.
#   "writes": what the CLI must be able to write in its sandbox besides the worker's
#     own folder and workers/w<n>, where setup puts its config and state (Claude's
#     CLAUDE_CONFIG_DIR, Codex's CODEX_HOME, Gemini's GEMINI_CLI_HOME, aider's history).
AGENTS = {
    "claude": {
        "install": "npm install -g @anthropic-ai/claude-code", "credentials": lambda: credentials(
            ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"), claude_user_dir(), ".credentials.json"),
        "login": "run `claude` once and log in, or export ANTHROPIC_API_KEY",
        "seed": claude_seed, "setup": claude_setup,
        # 2.1.197: the input line is "❯" + NBSP; past messages use "❯ " (normal space), menus "❯ 1. Yes".
        # Claude Code 1.x drew "│ > " inside a box instead.
        "prompt": r"^\s*❯\u00a0|^│ > ",
        "above": 8, "below": None,  # spinner "✽ Generating…" sits 4 rows above the input line
        # Footers: "? for shortcuts" (2.1.197); 2.1.331 shows "⏵⏵ auto mode on (shift+tab to cycle)"
        # or "⏸ manual mode on · ? for shortcuts"; also "⏵⏵ accept edits on", "⏸ plan mode on".
        "idle": [r"\? for shortcuts", r"[⏵⏸]+ [\w '’]+ on\b"],
        "busy": [r"esc to interru",  # 2.1.197 footer, cut to "esc to interru…" in narrow panes
                 r"^\s*[·✢✳✶✻✽*] \S+…",  # spinner "· Boogieing… (2m 28s"; done is "✻ Cooked for 0s"
                 r"(?i)retrying in \d", r"Compacting conversation",
                 r"ctrl\+b (ctrl\+b \(twice\) )?to run in background",
                 r"Press up to edit queued messages"],
        # Every dialog replaces the input box, so these are only looked for from the input line down:
        # an answered question or quoted text higher up in the transcript never counts.
        "permission": [r"Do you want to (proceed|make this edit|create|overwrite|write|allow)",
                       r"Would you like to proceed\?", r"Tab to amend", r"No, and tell Claude",
                       r"Yes, and (don't ask again|always allow)"],
        "dialog": [r"^\s*❯ \d+\. ", r"Enter to (confirm|continue)", r"Esc to cancel",  # 2.1.331 notice
                   r"one you trust|Do you trust the files", r"Select login method",
                   r"Choose the text style", r"Bypass Permissions mode", r"custom API key"],
        "login_screen": r"Select login method",
        "limited": [r"(?i)usage limit reached", r"(?i)hit your [\w ]*limit",
                    r"(?i)limit reached\W+resets?"],  # "Weekly limit reached · resets 10am"
        # "⠂ Claude Code" (2.1.197), "◐ Claude Code" (2.1.331); idle and permission: "✳ Claude Code"
        "title_busy": r"^[\u2800-\u28ff◐◓◑◒]",
        # 2.1.197 trust question; option 1 (the default) trusts the workdir.
        # Only when the selection sits on "trust": the --add-dir question
        # ("Adding a new directory") defaults to "No, exit".
        "answer": [(r"❯ 1\. Yes, I trust this folder", ["Enter"])],
    },
    "codex": {
        "install": "npm install -g @openai/codex", "setup": codex_setup,
        "credentials": lambda: credentials(("OPENAI_API_KEY", "CODEX_API_KEY"), os.environ.get(
            "CODEX_HOME") or os.path.expanduser("~/.codex"), "auth.json"),
        "login": "run `codex login`, or export OPENAI_API_KEY",
        # 0.169: the composer's "›" is bold; past messages draw "› " bold+dim, so with dim text
        # removed only the composer matches. Its placeholder "Ask Codex to do anything" is dim.
        # Menus ("› 1. Yes, proceed (y)") are reverse video and excluded anyway.
        "prompt": r"^›(?! \d+\. )\s?",
        "above": 8, "below": None,
        "idle": [r"\? for shortcuts", r"Ask Codex to do anything"],
        # The 0.169 busy capture shows no "Working (9s • esc to interrupt)" line while text streams,
        # but queued follow-ups exist only while a turn runs.
        "busy": [r"esc to interrupt", r"Queued follow-up", r"submitted after next tool call",
                 r"Reconnecting"],  # offline: "Reconnecting... waiting for network" forever
        "permission": [r"Would you like to (run|make|apply)", r"Yes, proceed",
                       r"don't ask again for"],
        "dialog": [r"^\s*[›>] \d+\. ", r"Press enter to continue", r"enter continue",
                   r"Trust this folder|Do you trust the contents", r"Sign in with",
                   r"Press enter to save", r"Paste or type your API key",     # 0.171, no login: its key entry
                   r"esc dismiss & close"],    # 0.171: the config warnings overlay (f2), "k keep & next"
        "login_screen": r"Sign in with ChatGPT|Sign in another way|Use your own OpenAI API key|Paste or type your API key",
        "limited": [r"(?i)hit your usage limit", r"(?i)usage limit reached"],
        "title_busy": r"^[\u2800-\u28ff]",  # "⠴ <dir>"; approval: "[ . ] Action Required | <dir>"
        "queue_key": "Tab",   # while a turn runs Enter steers it (submits into it); Tab queues the message
        # 0.171, a model pinned in config.toml or by -m that has a successor ("gpt-5.5"), in a
        # CODEX_HOME that has not recorded the answer ([notice.model_migrations]): "Meet GPT-6 Sol",
        # "› 1. Try new model" (the default; Enter and Esc both confirm it), "2. Use existing model".
        "answer": [(r"› 1\. Trust and continue", ["Enter"]), (r" 2\. Use existing model", ["2"])],
    },
    "gemini": {
        "install": "npm install -g @google/gemini-cli",
        "credentials": lambda: credentials(("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI"),
                                           os.environ.get("GEMINI_CLI_HOME") or os.path.expanduser("~"),
                                           ".gemini", "oauth_creds.json"),
        "login": "run `gemini` once and log in with Google, or export GEMINI_API_KEY",
        "seed": gemini_seed, "setup": gemini_setup,
        # 0.61: " > " ("!" in shell mode, "*" in YOLO mode); the cursor is reverse video and the grey
        # (not dim) placeholder "Type your message..." follows it. 0.1.x drew "│ > " in a box.
        "prompt": r"^[\s│]*[>!*] ",
        "above": 6, "below": None,  # "⠇ Thinking... (esc to cancel, 1s)" sits 4 rows above
        "idle": [r"Type your message", r"\? for shortcuts"],
        # A braille spinner is also drawn while waiting for approval: permission is checked first.
        "busy": [r"esc to cancel", r"Queued \(press", r"^\s*[\u2800-\u28ff] \S"],
        "permission": [r"Allow execution", r"Apply this change", r"Allow once",
                       r"Allow for this session", r"Do you want to proceed"],
        "dialog": [r"^[\s│]*● \d+\. ", r"Do you trust", r"How would you like to authenticate",
                   r"Use Enter to select", r"Enter Gemini API Key", r"Paste your API key here"],
        "login_screen": r"How would you like to authenticate|Enter Gemini API Key",
        "limited": [r"(?i)reached your daily .*quota", r"(?i)quota (limit|exceeded)",
                    r"(?i)usage limit reached"],
        "title_busy": r"Working",  # "✦  Working… (<dir>)"; idle "◇  Ready"; "✋  Action Required"
        # The spinner is drawn above the input box. While a turn streams, 0.61 redraws its live
        # area: a capture can catch the spinner drawn and the input box not yet, below a past
        # message's " > " echo, which is then no draft.
        "above_only": r"^\s*[\u2800-\u28ff] .*\(esc to cancel",
        "answer": [(r"● 1\. Trust folder", ["Enter"])],
    },
    "aider": {
        # Line REPL (prompt_toolkit): "> " or "<mode>> " on the last line; no own cursor, and old
        # "> ..." lines stay in the scrollback, so only the bottom line can be the live prompt.
        "prompt": r"^[\w-]*>( |$)", "above": 0, "below": 0,
        "busy": [r"Waiting for ", r"Retrying in "],  # spinner "Waiting for <model>"
        # "Create new file? (Y)es/(N)o [Yes]: " is live only while it ends the screen (\Z).
        "permission": [r"\(Y\)es/\(N\)o.*\]: *\Z"],
        "limited": [r"(?i)exceeded your current quota"],
        "setup": aider_setup,
    },
    "sim": {  # orch's built-in simulated agent (`orch.py sim`)
        "command": ["sim"],
        "prompt": r"^sim>( |$)", "above": 2, "below": 0, "busy": [r"^sim: working"], "settle": 0,
    },
    "generic": {"settle": 0},  # any other command: no markers; idle is 3 s without a screen change
}


# --- Claude telemetry: hooks and status line -------------------------------------
# A Claude worker's hooks and status line are `orch hook` (claude_seed), run in its
# sandbox, so they write only its own workers/w<n>: every hook is an `agent` record
# in hooks.jsonl (what `log` shows), the status line's cost and context go to
# usage.json, and a Write into a file of another worker's goes to foreign.jsonl as
# well, which voids that round file's verdicts.

CLAUDE_HOOKS = ("SessionStart", "UserPromptSubmit", "PostToolUse", "Stop", "StopFailure",
                "Notification", "PreCompact")
WRITE_TOOLS = ("Write", "Edit", "MultiEdit", "NotebookEdit")
HOOK_WORDS = {"SessionStart": "session started", "UserPromptSubmit": "prompt:", "Stop": "turn ended",
              "StopFailure": "turn FAILED:", "Notification": "notice:", "PreCompact": "compacting context",
              "refused": "orch refused, as the lead's:"}


def owner(fleet, path):
    """The worker whose folder in shared/ holds `path` (w<m>/...), 0 for the
    rest of shared/ (orch's: briefs, the bus, the matrix), None outside it."""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(shared_dir(fleet)))
    m = re.match(r"w(\d{1,6})(/|$)", rel)
    return int(m.group(1)) if m else None if rel == ".." or rel.startswith("../") else 0


def telemetry(fleet, n):
    """Worker n's Telemetry, from what its status line last wrote; its cost
    never below the highest orch saw (costs.json: a worker can write its own
    usage.json, never the run dir)."""
    path = os.path.join(state_dir(fleet, n), "usage.json")
    state, reported = read_state(path), None
    with contextlib.suppress(OSError):
        reported = os.lstat(path).st_mtime

    def number(v, top):
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= top else None
    costs = read_state(os.path.join(fleet["run"], "costs.json"))
    said, seen = number(state.get("cost_usd"), 1e6), number(costs.get(str(n)), 1e6)
    if said is not None and (seen is None or said > seen):
        costs[str(n)] = seen = said             # no lock: poll holds watch.json's
        with contextlib.suppress(OSError):      # a read-only run dir: inside a sandbox (record_hook)
            write_json(os.path.join(fleet["run"], "costs.json"), costs)
    return Telemetry(seen, number(state.get("context_pct"), 100), reported)


def foreign_writes(fleet, since=0.0):
    """{writer n: [(owner, path)]}: files of another worker (or orch's) that a
    Claude worker's Write or Edit changed since `since`, as its hooks said.
    None in an isolated fleet: there such a write cannot land, and the record
    is in the writer's own folder, so one there is the writer's forgery."""
    found = {}
    for w in [w["n"] for w in fleet["workers"]] * (not fleet.get("isolate")):
        for line in (read_untrusted(os.path.join(state_dir(fleet, w), "foreign.jsonl"))[0] or "").splitlines():
            with contextlib.suppress(ValueError, RecursionError):
                rec = json.loads(line)
                o, f, t = (rec.get(k) if isinstance(rec, dict) else None for k in ("owner", "file", "t"))
                if type(o) is int and o != w and isinstance(f, str) and f and "\0" not in f \
                        and finite(t) and since <= t <= time.time() + 60 and (o, f) not in found.get(w, []):
                    found.setdefault(w, []).append((o, f))
    return found


def record_hook(fleet, n, data):
    """What one hook of worker n told orch (Claude Code's JSON), recorded;
    returns the text for its status line, or None for a hook."""
    mine = state_dir(fleet, n)
    if data.get("hook_event_name") is None:       # the status line
        cost, context = data.get("cost") or {}, data.get("context_window") or {}
        said, before = cost.get("total_cost_usd"), telemetry(fleet, n).cost_usd
        if before is not None and not (finite(said) and said >= before):     # a cost never goes down
            said = before
        write_json(os.path.join(mine, "usage.json"), {
            "t": now_iso(), "cost_usd": said, "context_pct": context.get("used_percentage")})
        return "orch W%d" % n
    tool = data.get("tool_input") if isinstance(data.get("tool_input"), dict) else {}
    rec = {k: str(v)[:300] for k, v in (
        ("hook", data["hook_event_name"]), ("tool", data.get("tool_name")), ("file", tool.get("file_path")),
        ("command", tool.get("command")), ("prompt", data.get("prompt")), ("error", data.get("error")),
        ("notice", data.get("notification_type"))) if v}
    path = tool.get("file_path")            # whole, not the record's 300 characters
    theirs = owner(fleet, path) if rec.get("tool") in WRITE_TOOLS and isinstance(path, str) else None
    if theirs is not None and theirs != n:
        rec["foreign"] = theirs
        append_line(os.path.join(mine, "foreign.jsonl"), safe_json({"t": time.time(), "owner": theirs, "file": path}))
    append_line(os.path.join(mine, "hooks.jsonl"), safe_json(dict(t=now_iso(), event="agent", worker=n, **rec)))
    if rec.get("notice") in ("permission_prompt", "idle_prompt"):     # the screen is the judge
        w = pick_workers(fleet, n, allow_all=False)[0]
        capture = capture_panes(fleet, [w]).get(n)
        shows = capture and screen_state(w["profile"], capture.screen, capture.title)
        if shows != rec["notice"].split("_")[0]:
            append_line(os.path.join(mine, "hooks.jsonl"), safe_json(dict(
                t=now_iso(), event="agent", worker=n, hook=rec["hook"], disagree=rec["notice"], screen=shows or "unknown")))
    return None


def hook_line(rec):
    """`log`'s line for one `agent` event, or None for any other record."""
    if not isinstance(rec, dict) or rec.get("event") != "agent" or type(rec.get("worker")) is not int:
        return None
    hook = str(rec.get("hook"))
    said = [HOOK_WORDS.get(hook, hook)] if hook != "PostToolUse" else []
    said += [str(rec[k]) for k in ("tool", "file", "command", "prompt", "error", "notice") if k in rec]
    if "foreign" in rec:
        said.append("<- NOT ITS OWN: %s's file" % ("W%s" % rec["foreign"] if rec["foreign"] else "orch"))
    if "disagree" in rec:
        said = ["hooks say %s, the screen shows %s: the screen wins" % (rec["disagree"], rec.get("screen"))]
    return defang("%s W%d %s" % (str(rec.get("t"))[11:19], rec["worker"], " ".join(said).replace("\n", " ")))[:300]


# --- tmux ----------------------------------------------------------------------

def tmux(*args, stdin=None):
    """Run one tmux command (or a ';' batch); return its stdout as text."""
    import subprocess
    argv = ["tmux", "-u"] + [str(a) for a in args]     # -u: UTF-8 out, always
    try:
        r = subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise OrchError("tmux is not installed: install it (apt-get install tmux, brew install tmux)", 1, "missing")
    if r.returncode:
        err = (r.stderr.decode("utf-8", "replace").strip().splitlines() or ["exit %d" % r.returncode])[0]
        kind = None
        if "no server running" in err or "error connecting" in err or "server exited" in err:
            kind = "server"
        elif "can't find" in err or "no such" in err:
            kind = "target"
        raise OrchError("tmux %s: %s" % (args[0], err), 1, kind, output=r.stdout.decode("utf-8", "replace"))
    return r.stdout.decode("utf-8", "replace")


def session_of(name):
    return "orch-" + name


def live_sessions():
    """Names of live tmux sessions; no server is a state, not an error."""
    try:
        return set(tmux("list-sessions", "-F", "#{session_name}").split())
    except OrchError as e:
        if e.kind in ("server", "target"):
            return set()
        raise


def session_home(session):
    """The ORCH_HOME a live session was spawned from ('' if none is recorded)."""
    try:
        return tmux("show-options", "-v", "-t", "=%s:" % session, "@orch_home").strip()
    except OrchError:
        return ""


def pane_tag(fleet, n):
    """What orch tags worker n's pane with: the fleet's id (new at each spawn) and n,
    so a pane id reused after a server restart, or another fleet's pane, is never n's."""
    return "%s:%d" % (fleet.get("id", ""), n)


def capture_panes(fleet, workers, history=False, ansi=True, then=()):
    """One look at the fleet: the session's pane listing plus a capture of
    each worker's pane, in one tmux process, with the commands `then` (a `;`
    batch's tail) run after them. Returns {n: Capture}; a worker
    missing from it has no pane of its own (gone, or its id now belongs to
    another pane: tagged for another worker); a gone session is an OrchError
    of kind "target". Each capture is preceded by a header line carrying a
    random nonce, which pane text cannot forge."""
    nonce = os.urandom(8).hex()
    panes = [w["pane"] for w in workers if w["pane"]]
    # "=<session>:" - list-panes takes a window target, and a bare "=orch-a" finds orch-ab (tmux 3.3a).
    listing = ["list-panes", "-s", "-t", "=%s:" % fleet["session"], "-F",
               "%s\t#{pane_id}\t#{pane_dead}\t#{@orch_worker}\t#{pane_title}" % nonce]
    for attempt in (1, 2):
        argv = list(listing)
        for p in panes:
            # The header is a format, not text: a literal "%3" would go through strftime.
            argv += [";", "display-message", "-p", "-t", p, nonce + " #{pane_id}",
                     ";", "capture-pane", "-p", "-t", p] + (["-e"] if ansi else []) \
                + (["-S", "-", "-E", "-"] if history else [])
        try:
            out = tmux(*(argv + list(then)))
        except OrchError as e:
            if e.kind == "missing":
                raise
            if e.kind == "server" or not e.output:
                raise OrchError("fleet %r is not running: its tmux session %s is gone (`orch status "
                                "%s` shows its files, `orch respawn %s N` restarts a worker)" % (
                                    fleet["name"], fleet["session"], fleet["name"], fleet["name"]),
                                1, "target")
            out = e.output
        listed, screens, cur = {}, {}, None
        for line in out.split("\n"):
            head = line.split("\t", 4) if line.startswith(nonce + "\t") else None
            if head and len(head) == 5:
                listed[head[1]] = head
                screens[head[1]] = []
            elif line.startswith(nonce + " "):
                cur = screens.get(line[len(nonce) + 1:])
            elif cur is not None:
                cur.append(line)
        if attempt == 2 or all(p in listed for p in panes):
            captures = {p: Capture(p, dead == "1", tag, title, "\n".join(screens[p]))
                        for p, (_, _, dead, tag, title) in listed.items()}
            return {w["n"]: captures[w["pane"]] for w in workers if w["pane"] in captures and (
                "id" not in fleet or captures[w["pane"]].tag == pane_tag(fleet, w["n"]))}
        # A pane died between listing and capture (the batch stopped there):
        # re-list once and capture only what is alive.
        panes = [p for p in panes if p in listed]


# --- files ---------------------------------------------------------------------

def orch_home(create=False):
    """ORCH_HOME, checked; made (0700) only for a command about to write there."""
    home = os.path.abspath(os.path.expanduser(os.environ.get("ORCH_HOME") or "~/.orch"))
    runs = os.path.join(home, "runs")
    try:
        if create:
            os.makedirs(runs, mode=0o700, exist_ok=True)
            os.chmod(home, 0o700)
        elif not os.path.isdir(runs):
            os.listdir(runs)        # missing is no fleets yet; anything else is a problem
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OrchError("cannot use ORCH_HOME %s: %s: set ORCH_HOME to a writable directory"
                        % (home, e.strerror))
    return home


def own_argv():
    """How orch runs itself (worker panes, hooks, the sim, the demo's steps): a copy
    of orch.py compiled once into ORCH_HOME/cache, named by orch.py's path and content
    and Python's version (the copy carries the path: it is what ORCH is when it runs),
    as a script run as `python3 orch.py` is compiled anew at every start (most of what
    a hook costs); orch.py itself where no sound copy can be had. -S: orch imports
    nothing from site-packages, so it skips what they add to a start."""
    import hashlib
    import importlib.util
    import marshal
    import tempfile
    try:
        with open(ORCH, "rb") as f:
            source = f.read()
        folder = os.path.join(orch_home(), "cache")
        path = os.path.join(folder, "orch-%s.%s.pyc" % (hashlib.sha1(
            ORCH.encode("utf-8", "surrogateescape") + b"\0" + source).hexdigest()[:16], sys.implementation.cache_tag))
        with contextlib.suppress(OSError, EOFError, ValueError, TypeError):
            with open(path, "rb") as f:     # sound: Python's magic, then code that loads
                data = f.read()
            if data[:4] == importlib.util.MAGIC_NUMBER and marshal.loads(data[16:]):
                return [sys.executable, "-S", path]
        os.makedirs(folder, mode=0o700, exist_ok=True)
        code = compile(source, ORCH, "exec", dont_inherit=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".new-")      # 0600, never a planted file
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(code))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return [sys.executable, "-S", path]
    except (OSError, OrchError, SyntaxError, ValueError):
        return [sys.executable, "-S", ORCH]


def check_name(name):
    if not re.match(NAME_PATTERN, name or ""):
        raise OrchError("bad fleet name %r: use 1-32 letters, digits, '-' or '_', starting "
                        "with a letter or digit" % name, 2)
    return name


def run_dir(name):
    return os.path.join(orch_home(), "runs", check_name(name))


def shared_dir(fleet):
    return os.path.join(fleet["run"], "shared")


def worker_dir(fleet, n):
    """Worker n's own folder in shared/: all it delivers, and the only place
    there it can write (its sandbox lets it write nothing else of the fleet's)."""
    return os.path.join(shared_dir(fleet), "w%d" % int(n))


def worker_file(fleet, n, name):
    """Worker n's brief, shared/agent-<n>.task.md (orch's), or a file of its
    folder: result.md, done, bus.md (its outbox), r<k>.result.md, r<k>.done."""
    if name == "task.md":
        return os.path.join(shared_dir(fleet), "agent-%d.task.md" % int(n))
    return os.path.join(worker_dir(fleet, n), name)


def state_dir(fleet, n):
    """Worker n's agent config and state, and what its hooks record: the other
    place its sandbox lets it write."""
    return os.path.join(fleet["run"], "workers", "w%d" % int(n))


def own_dir(path):
    """`path`, a directory orch writes into from outside a worker's sandbox
    (its agent's config in its state dir): a link or file the worker planted
    there is moved aside first, so orch never writes where it points."""
    if os.path.islink(path) or os.path.lexists(path) and not os.path.isdir(path):
        archive(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def is_done(fleet, n):
    """Worker n's done flag exists, or existed when orch kept its result."""
    return os.path.exists(worker_file(fleet, n, "done")) or os.path.exists(kept_path(fleet, "w%d.result.md" % n))


def kept_path(fleet, name):
    """orch's own copy of a deliverable, in the run dir (workers cannot write it)."""
    return os.path.join(fleet["run"], "kept", name)


def keep(fleet, name, text):
    os.makedirs(os.path.dirname(kept_path(fleet, name)), mode=0o700, exist_ok=True)
    write_file(kept_path(fleet, name), text)


def result_of(fleet, n):
    """Worker n's result as orch first read it with its done flag there:
    (text or None, what was wrong or cut, what changed since or None). orch
    keeps a copy then, and uses only that copy from then on."""
    live, why = read_untrusted(worker_file(fleet, n, "result.md"))
    kept = read_text(kept_path(fleet, "w%d.result.md" % n))
    if kept is None:
        if live is not None and os.path.exists(worker_file(fleet, n, "done")):
            keep(fleet, "w%d.result.md" % n, live)
        return live, why, None
    return kept, None, None if live == kept else "W%d's result %s after orch read it: orch's copy counts" % (
        n, "was removed" if live is None else "changed")


def bus_path(fleet):
    return os.path.join(shared_dir(fleet), "bus.md")


def archive(path):
    """Move a run, a result or a done flag aside as <path>.old-<stamp>: archive, never truncate."""
    import datetime
    old = "%s.old-%s" % (path, datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f"))
    os.rename(path, old)
    return old


def write_file(path, text, at=None):
    """Atomic write (temp + rename): readers never see half a file, and a
    symlink planted at `path` is replaced, never followed. With `at`, a
    directory descriptor, `path` is a name in that directory: a worker that
    swaps the directory's path for a link cannot lead the write elsewhere."""
    with contextlib.suppress(OSError):     # a directory planted where orch writes a file
        if stat.S_ISDIR(os.stat(path, dir_fd=at, follow_symlinks=False).st_mode):
            archive(path if at is None else os.path.join("/proc/self/fd/%d" % at, path))
    tmp = "%s.%s.tmp" % (path, os.urandom(4).hex())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=at)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path, src_dir_fd=at, dst_dir_fd=at)
    except BaseException:               # a full disk leaves no *.tmp behind
        with contextlib.suppress(OSError):
            os.remove(tmp, dir_fd=at)
        raise


def defang(text):
    """Worker text made safe for a terminal and for the files a person reads:
    CONTROLS, BIDI and INVISIBLE are shown as \\uXXXX (\\UXXXXXXXX past
    U+FFFF), never passed raw (no OSC 52 clipboard write, no ESC[2J, no
    hidden sentence)."""
    return re.sub("[%s%s%s]" % (CONTROLS, BIDI, INVISIBLE),
                  lambda m: ("\\u%04x" if ord(m.group()) < 0x10000 else "\\U%08x") % ord(m.group()), text)


def cut(text, width):
    """`text`, at most `width` characters: what is cut shows as '…'."""
    return text if len(text) <= width else text[:width - 1] + "…"


def one_line(text, width=80):
    """Worker text in one line of at most `width` characters, defanged."""
    return cut(" ".join(defang(text).split()), width)


def clean_text(text):
    """Text for a pane: CONTROLS removed, so only newline and tab survive."""
    return re.sub("[%s]" % CONTROLS, "", text.replace("\r\n", "\n")).strip("\n")


def safe_json(obj, indent=None):
    """JSON with non-ASCII kept readable and every unsafe character escaped
    (inside JSON strings \\uXXXX is the same character, so values do not change)."""
    return defang(json.dumps(obj, indent=indent, ensure_ascii=False))


def write_json(path, obj):
    write_file(path, safe_json(obj, 2) + "\n")


def open_append(path):
    """A descriptor to append to `path`, a regular file (made if missing): never
    a planted link, and a FIFO never blocks."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    except OSError as e:                # ENXIO: a FIFO nobody reads; ELOOP: a planted link
        if e.errno not in (errno.ENXIO, errno.ELOOP):
            raise
        fd = None
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise OrchError("%s is not a regular file (a worker replaced it?): move it aside" % path)
    return fd


def append_line(path, line, first=None):
    """Append one whole line under an exclusive lock (bus.md, events.jsonl);
    never to a planted link or FIFO. first(offset), if given, runs under the
    lock just before the line is written there."""
    fd = open_append(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if first:
            first(os.lseek(fd, 0, os.SEEK_END))
        os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8"))
    finally:
        os.close(fd)            # closing releases the lock


def read_text(path, default=None):
    """A file orch keeps, or the user's own (a link is followed: dotfile
    managers make them), whole; `default` unless it is a regular file, so a
    FIFO planted in its place never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return default
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8", "replace") if stat.S_ISREG(os.fstat(fd).st_mode) else default


def read_untrusted(path, start=0, raw=False):
    """A file a worker can write (results, verdicts, cited files, the bus),
    read without trusting it: a regular file only, checked on the opened
    descriptor (a FIFO never blocks, a planted link is not followed), from
    byte `start`, at most READ_CAP bytes; text cut there ends at its last whole
    line. Returns (text, or bytes if `raw`, or None; what was wrong or cut, or None)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError as e:
        return None, "not read: %s" % ("a symbolic link" if os.path.islink(path) else e.strerror)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, "not read: not a regular file"
        f.seek(start)
        data = f.read(READ_CAP + 1)
    why = "cut at %d MB" % (READ_CAP >> 20) if len(data) > READ_CAP else None
    if raw:
        return data[:READ_CAP], why
    return data[:READ_CAP][:data.rfind(b"\n", 0, READ_CAP) + 1 if why else None].decode("utf-8", "replace"), why


def file_digest(path):
    """What a worker-writable file holds now (None: nothing readable), to tell later whether it changed."""
    import hashlib
    data, why = read_untrusted(path, raw=True)
    return None if data is None else hashlib.sha1(data).hexdigest() + (why or "")


def read_state(path, fleet=None):
    """A JSON object orch keeps for itself (watch.json, cursors, env.json):
    missing or damaged means start afresh, never a crash; a damaged one is
    noted in fleet["notes"], which the command shows in one line."""
    text, _ = read_untrusted(path)
    try:
        state = json.loads(text or "{}")
    except (ValueError, RecursionError):        # [[[[... nested past Python's stack is damage too
        state = None
    if not isinstance(state, dict):
        if fleet is not None:
            fleet.setdefault("notes", []).append("%s was damaged: started afresh" % path)
        return {}
    return state


@contextlib.contextmanager
def updating(fleet, name):
    """Read, change and write back one of orch's state files (watch.json,
    bus-cursors.json) under one lock per fleet: concurrent orch processes take
    turns, and none loses another's change."""
    fd = os.open(fleet["run"], os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        state = read_state(os.path.join(fleet["run"], name), fleet)
        yield state
        try:
            write_json(os.path.join(fleet["run"], name), state)
        except OSError as e:            # a full disk must not stop status or wait
            fleet.setdefault("notes", []).append("%s not saved: %s" % (name, e.strerror))
    finally:
        os.close(fd)


def finite(v):
    """A real number, neither NaN nor infinite: what a JSON state file may hold for a time."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def now_iso():
    import datetime
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def log_event(fleet, event, **fields):
    """One record in events.jsonl, the fleet's trail; a full or read-only disk
    costs the record (noted), never the command."""
    rec = dict(t=now_iso(), event=event, **fields)
    try:
        append_line(os.path.join(fleet["run"], "events.jsonl"), safe_json(rec))
    except OSError as e:
        fleet.setdefault("notes", []).append("events.jsonl not written: %s" % e.strerror)


def load_fleet(name):
    rd = run_dir(name)
    text = read_text(os.path.join(rd, "fleet.json"))
    if text is None:
        raise OrchError("no fleet %r in %s: `orch status` lists fleets, `orch spawn %s N` "
                        "starts one" % (name, os.path.dirname(rd), name), 2)
    try:
        fleet = json.loads(text)
    except (ValueError, RecursionError):
        fleet = None
    workers = fleet.get("workers") if isinstance(fleet, dict) else None
    if not (isinstance(fleet, dict) and fleet.get("version") == SCHEMA and isinstance(workers, list)
            and isinstance(fleet.get("workdir"), str) and isinstance(fleet.get("agent"), str)
            and all(isinstance(w, dict) and w.get("n") == i and w.get("profile") in AGENTS
                    and isinstance(w.get("agent"), str) and isinstance(w.get("pane"), (str, type(None)))
                    for i, w in enumerate(workers, 1))):
        raise OrchError("%s/fleet.json is corrupt or from another orch version: inspect it, or "
                        "`orch spawn %s N --force` to archive it and start over" % (rd, name))
    fleet.update(run=rd, name=name, session=session_of(name))   # never trust a stored path or name
    return fleet


def save_fleet(fleet):
    write_json(os.path.join(fleet["run"], "fleet.json"),
               {k: v for k, v in fleet.items() if k not in ("run", "notes")})


def fleet_names():
    """Fleets in ORCH_HOME (none before the first spawn); archived runs
    (<name>.old-<stamp>) are not fleets."""
    runs = os.path.join(orch_home(), "runs")
    return [d for d in sorted(os.listdir(runs)) if re.match(NAME_PATTERN, d)] if os.path.isdir(runs) else []


def pick_workers(fleet, spec, allow_all=True):
    """'all' or a worker number -> list of worker dicts, checked at the door."""
    workers = fleet["workers"]
    if spec == "all" and allow_all:
        return list(workers)
    if not re.match(r"[0-9]{1,9}\Z", str(spec)) or not 1 <= int(spec) <= len(workers):
        raise OrchError("no worker %r in fleet %r: it has workers 1-%d%s"
                        % (str(spec)[:20], fleet["name"], len(workers), " (or 'all')" if allow_all else ""), 2)
    return [workers[int(spec) - 1]]


def inside_worker(fleet):
    """The worker of `fleet` whose pane this process runs in, or None: the
    outermost of this process and its ancestors whose environment names the
    fleet and its ORCH_HOME, which is the pane's own (orch set it; a worker
    can change only its children's). 0: a pane of the fleet, worker unknown."""
    home, pid, found = os.path.realpath(orch_home()), os.getpid(), None
    mark = ("ORCH_FLEET=%s" % fleet["name"]).encode()
    ours = lambda env: mark in env and any(x.startswith(b"ORCH_HOME=") and os.path.realpath(
        os.fsdecode(x[10:])) == home for x in env)         # a link to ORCH_HOME is ORCH_HOME
    if ours({os.fsencode("%s=%s" % kv) for kv in os.environ.items() if kv[0] in ("ORCH_FLEET", "ORCH_HOME")}):
        found = os.environ.get("ORCH_WORKER", "").encode()
    for _ in range(256):                # /proc, where there is one
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                env = set(f.read().split(b"\0"))
            with open("/proc/%d/stat" % pid, "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if ours(env):
            found = next((x[12:] for x in env if x.startswith(b"ORCH_WORKER=")), b"")
        if pid < 1:
            break
    return None if found is None else int(found) if found.isdigit() and len(found) < 7 else 0


def refuse(fleet, n, action):
    """A lead-only action tried from inside worker n: an event (in its own
    hooks.jsonl, which `log` shows, when its sandbox keeps it from the run
    dir's events.jsonl), and an error."""
    try:
        append_line(os.path.join(fleet["run"], "events.jsonl"), safe_json(dict(
            t=now_iso(), event="refused", worker=n, action=action)))
    except OSError:
        with contextlib.suppress(OSError):
            append_line(os.path.join(state_dir(fleet, n or 0), "hooks.jsonl"), safe_json(dict(
                t=now_iso(), event="agent", worker=n, hook="refused", command="orch " + action)))
    raise OrchError("`orch %s` is the lead's: it is refused from inside a worker of fleet %r (W%s)"
                    % (action, fleet["name"], n or "?"))


def lead_only(fleet, action):
    """Refuse `action` when a worker of the fleet runs it."""
    n = inside_worker(fleet)
    if n is not None:
        refuse(fleet, n, action)


def read_lines(path, start=0, raw=False):
    """The whole lines of a growing file (read as untrusted) from byte `start`:
    (lines, or bytes lines if `raw`, None if it cannot be read; the offset
    after the last whole one; what was wrong or None). A line still being
    written is left for the next call."""
    data, why = read_untrusted(path, start, raw=True)
    if data is None:
        return None, start, why
    whole = data[:data.rfind(b"\n") + 1]
    if why and not whole:               # one line longer than READ_CAP: skipped, never read again
        return [], start + len(data), why
    return (whole if raw else whole.decode("utf-8", "replace")).split(b"\n" if raw else "\n")[:-1], \
        start + len(whole), why


# --- the bus: each worker's outbox, merged by orch ------------------------------
# A worker posts by appending to its outbox, shared/w<n>/bus.md. orch merges every
# outbox into shared/bus.md, which only orch writes: each line as "[W<n>] ..." by
# the folder it came from, never by its text, beside orch's own and the lead's.
# bus-posted keeps where each line orch wrote starts and its hash: a line at any
# other place, or changed, was not written by orch (a worker without a sandbox).

def post(fleet, who, text):
    """Append one line to the bus under the lock, and remember it as orch's."""
    import hashlib
    line = ("[%s] %s" % (who, text)).replace("\n", " ")
    append_line(bus_path(fleet), line, lambda at: append_line(     # first: no reader sees the line without it
        os.path.join(fleet["run"], "bus-posted"), "%d %s" % (at, hashlib.sha1(line.encode()).hexdigest())))


def merge_outboxes(fleet):
    """Bring each worker's new outbox lines into the bus, in the order orch
    sees them, at most BUS_LINE characters each. An outbox that shrank is
    noted: the bus keeps what orch merged."""
    sizes = {}
    for w in fleet["workers"]:
        with contextlib.suppress(OSError):
            sizes[str(w["n"])] = os.lstat(worker_file(fleet, w["n"], "bus.md")).st_size
    if all(read_state(os.path.join(fleet["run"], "outboxes.json")).get(n) == s for n, s in sizes.items()):
        return                          # the common case: one stat per worker, no lock
    with updating(fleet, "outboxes.json") as seen:
        try:
            for n, size in sorted(sizes.items(), key=lambda kv: int(kv[0])):
                at = seen.get(n) if type(seen.get(n)) is int else 0
                if size < at:
                    fleet.setdefault("notes", []).append("W%s's outbox shrank after orch merged it: the bus "
                                                         "keeps what orch merged" % n)
                    seen[n] = size
                    continue
                lines, end, _ = read_lines(worker_file(fleet, int(n), "bus.md"), at, raw=True)
                for raw in (lines or [])[:MERGE_CAP]:       # the rest at the next call: no call stalls
                    text = " ".join(clean_text(re.sub(r"^\s*\[W%s\] ?" % n, "", raw.decode(
                        "utf-8", "replace"))).split())
                    if text:
                        post(fleet, "W" + n, cut(text, BUS_LINE))
                    seen[n] = at = at + len(raw) + 1
                if len(lines or []) <= MERGE_CAP:
                    seen[n] = end                   # past a line too long to read, too
        except (OrchError, OSError) as e:           # the rest waits for a bus orch can write
            fleet.setdefault("notes", []).append("the outboxes were not merged: %s" % e)
        except BaseException:                       # an interrupt: what was merged stays merged
            write_json(os.path.join(fleet["run"], "outboxes.json"), seen)
            raise


def bus_posts(fleet, start=0):
    """The bus's whole lines from byte `start`, as Posts, and the offset after them."""
    import hashlib
    lines, end, _ = read_lines(bus_path(fleet), start, raw=True)
    written = set(read_text(os.path.join(fleet["run"], "bus-posted"), "").split("\n"))
    posts, at = [], start
    for raw in lines or []:
        posts.append(Post(at, "%d %s" % (at, hashlib.sha1(raw).hexdigest()) in written,
                          raw.decode("utf-8", "replace")))
        at += len(raw) + 1
    return posts, end


def shown(p):
    """A bus Post as a person reads it: defanged, at most BUS_LINE characters
    (a line forged into the bus can be megabytes), and marked unless orch wrote it there."""
    return defang(("" if p.genuine else "(not written by orch) ") + cut(p.text, BUS_LINE))


def bus_tail(fleet, count=None):
    """The bus's last `count` lines (None: all of its last 16 MB), as shown."""
    path = bus_path(fleet)
    start = max(0, os.lstat(path).st_size - READ_CAP) if os.path.isfile(path) else 0
    posts = bus_posts(fleet, start)[0][1 if start else 0:]
    return [shown(p) for p in posts[max(0, len(posts) - count) if count is not None else 0:]]


# --- screens and states --------------------------------------------------------

BOTTOM = 25  # rows searched when no input line is on screen (dialogs fill the lower part)
ESCAPE_PATTERN = r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)?|\x1b[()]?[^\[\]\n]"


def norm(s):
    return " ".join(s.split())


def strip_ansi(s):
    """Remove CSI (SGR, cursor...) and OSC escapes."""
    return "".join(re.split("(%s)" % ESCAPE_PATTERN, s)[::2])


def _visible(ansi):
    """Screen lines without dim text, with "\\0" where reverse video starts (Claude and Gemini
    draw their cursor that way). capture-pane -e carries SGR state across lines."""
    lines, dim, rev = [""], False, False
    for n, part in enumerate(re.split("(%s)" % ESCAPE_PATTERN, ansi)):
        if n % 2 == 0:
            for k, piece in enumerate(part.split("\n")):
                if k:
                    lines.append("")
                if not dim:
                    lines[-1] += piece
        elif part.startswith("\x1b[") and part.endswith("m"):
            codes, i, was_rev = part[2:-1].split(";"), 0, rev
            while i < len(codes):
                c = codes[i]
                if c in ("", "0"):
                    dim = rev = False
                elif c in ("2", "22"):
                    dim = c == "2"
                elif c in ("7", "27"):
                    rev = c == "7"
                elif c in ("38", "48", "58"):  # 38;5;N and 38;2;R;G;B: skip the colour numbers
                    i += {"5": 2, "2": 4}.get(codes[i + 1] if i + 1 < len(codes) else "", 0)
                i += 1
            if rev and not was_rev:
                lines[-1] += "\0"
    return lines


def screen_state(profile, ansi_screen, title):
    """What the screen of an agent of `profile` (an AGENTS name) shows: one of
    "permission", "limited", "dialog", "busy", "draft", "idle", or None."""
    profile = AGENTS[profile]
    plain = [line.rstrip() for line in strip_ansi(ansi_screen).split("\n")]
    vis = _visible(ansi_screen)
    rows = [i for i, line in enumerate(plain) if line.strip()]
    if not rows:
        return None
    last, p, m = rows[-1], None, None
    for i in reversed(rows if profile.get("prompt") else []):  # lowest match = live input line
        m = re.search(profile["prompt"], vis[i])
        if m:
            p = i
            break
    if p is not None and profile["below"] is not None and last - p > profile["below"]:
        p = None  # e.g. aider's "> old input" followed by output
    if p is not None and re.search(profile.get("above_only") or r"\Z.", "\n".join(plain[p + 1:last + 1]), re.M):
        p = None  # a frame caught mid-redraw: its lowest prompt line is a past message's echo
    # box: where questions live (all three CLIs hide the input line while one is open);
    # top: box plus the live rows above the input line (spinner, status, last error).
    if p is None:
        top = box = max(0, last + 1 - BOTTOM)
    else:
        top, box = max(0, p - profile["above"]), p

    def found(key, start):
        text = "\n".join(plain[start:last + 1])
        return any(re.search(rx, text, re.M) for rx in profile.get(key, []))

    # A question waiting for an answer wins over a busy title (Gemini spins while waiting for
    # approval; Claude's title looks idle then). "limited" before "dialog": a limit may offer a menu.
    if found("permission", box):
        return "permission"
    if found("limited", top):
        return "limited"
    if found("dialog", box):
        return "dialog"
    # Draft = text after the prompt glyph, before the reverse-video cursor, dim text ignored;
    # a placeholder shown without the cursor (unfocused pane) is recognised by the idle markers.
    # Busy or not: nothing is typed onto a draft, and a paste left in the box is not submitted.
    draft = vis[p][m.end():].split("\0")[0].strip(" \u00a0│") if p is not None else ""
    if draft and not any(re.search(rx, draft) for rx in profile.get("idle", [])):
        return "draft"
    if found("busy", top) or re.search(profile.get("title_busy") or r"\Z.", title or ""):
        return "busy"
    if p is None:
        return "idle" if found("idle", box) else None
    return "idle"


def worker_row(w, capture, memo, now, stall, done):
    """Worker w's Row from its pane's Capture (None: the pane is gone) and
    orch's memory of its screen (`memo`, watch.json's entry, updated in place:
    the screen's hash and pane, since when it shows, whether it ever booted,
    when its limit resets, its last state)."""
    import zlib
    plain = strip_ansi(capture.screen) if capture else ""
    digest = "%08x" % zlib.crc32(plain.encode("utf-8", "replace"))     # tells a change, nothing more
    if (memo.get("hash"), memo.get("pane")) != (digest, w["pane"]):
        memo.update(hash=digest, since=now, pane=w["pane"])
    quiet = now - memo["since"]
    if capture is None or capture.dead:
        shows = "exited"
    elif w["profile"] == "generic":     # no markers: only screen change tells
        shows = ("busy" if quiet < 3 else "idle") if plain.strip() else None
    else:
        shows = screen_state(w["profile"], capture.screen, capture.title)
    if shows is None:                   # never typed into: busy and idle need evidence
        shows = "unknown" if memo.get("booted") else "booting"
    memo["booted"] = memo.get("booted") or shows in PAST_BOOT
    stalled = shows in PAST_BOOT and quiet >= stall    # shows stays what delivery must respect
    if shows != "limited":
        memo.pop("resets", None)
    elif memo.get("resets") is None:    # once read, kept: "try again in 5 minutes" counts from then
        memo["resets"] = reset_time(plain, now)
    lines = [ln for ln in plain.split("\n") if ln.strip()]
    return Row(n=w["n"], pane=w["pane"], shows=shows, state="done" if done else "stalled" if stalled else shows,
               done=done, quiet=round(quiet, 1), last=norm(lines[-1]) if lines else "", screen=plain,
               digest=digest, resets=memo.get("resets"), cost_usd=None, context_pct=None, reported=None, foreign=[])


AGAIN_PATTERN = r"(?i)try again in ((?:\d{1,4} ?(?:day|hour|minute|second|[dhms]\b)\w*[ ,.]*(?:and )?)+)"
CLOCK_PATTERN = r"(?i)\breset(?:s| at)? (?:at )?(1[0-2]|0?[1-9])(?::([0-5]\d))? ?([ap]m)\b(?: \(([\w/+-]{1,40})\))?"


def reset_time(screen, now):
    """When a usage limit on `screen` resets, in epoch seconds, or None when
    it does not say in a form orch can read ("try again in 4 days 6 hours",
    "resets 7pm (UTC)", "reset at 9:30am (America/Chicago)"): never guessed."""
    import datetime
    m = re.search(AGAIN_PATTERN, screen)
    if m:
        unit = {"d": 86400, "h": 3600, "m": 60, "s": 1}
        wait = sum(int(k) * unit[u[0].lower()] for k, u in re.findall(r"(\d+) ?([a-zA-Z])", m.group(1)))
        return now + wait if wait <= 400 * 86400 else None      # a screen can say anything
    m = re.search(CLOCK_PATTERN, screen)
    if not m:
        return None
    zone = m.group(4) or ""             # none: the local time zone
    try:
        import zoneinfo                 # Python 3.9+
    except ImportError:
        zoneinfo = None
    try:
        tz = datetime.timezone.utc if zone.upper() == "UTC" else zoneinfo.ZoneInfo(zone) if zone else None
    except (AttributeError, KeyError, ValueError):     # no zoneinfo (3.8), an unknown zone
        return None
    at = datetime.datetime.fromtimestamp(now, tz).replace(
        hour=int(m.group(1)) % 12 + (12 if m.group(3).lower() == "pm" else 0), minute=int(m.group(2) or 0),
        second=0, microsecond=0)
    if at.timestamp() <= now:           # a clock time already past today: tomorrow's
        at += datetime.timedelta(days=1)
    return at.timestamp()


def poll(fleet, stall=STALL, flags=None, ended_ok=True):
    """Every worker's Row from one look (one tmux process, whatever N). What
    was seen persists in watch.json, so stalls are seen across calls; every
    state change goes to events.jsonl. `flags` ({n: path}) replaces the done
    flags of workers briefed elsewhere (verification rounds). A gone session
    raises, unless every worker had finished and `ended_ok`."""
    flags = flags or {}
    with updating(fleet, "watch.json") as memory:
        try:
            captures, gone = capture_panes(fleet, fleet["workers"], then=label_commands(fleet, memory)), None
        except OrchError as e:
            captures, gone = {}, e
        # The flags after the screens: an agent touches its flag before it draws idle again.
        done = {w["n"]: os.path.exists(flags[w["n"]]) if w["n"] in flags else is_done(fleet, w["n"])
                for w in fleet["workers"]}
        if gone and not (ended_ok and all(done.values())):
            raise gone                      # else the session ended after every worker finished
        now, rows, foreign = time.time(), [], foreign_writes(fleet)
        for w in fleet["workers"]:
            memo = memory.setdefault(str(w["n"]), {})
            if not (isinstance(memo, dict) and all(finite(memo.get(k) or 0) for k in ("since", "resets", "nudged"))):
                fleet.setdefault("notes", []).append("watch.json was damaged for W%d: started afresh" % w["n"])
                memo = memory[str(w["n"])] = {}
            row = worker_row(w, captures.get(w["n"]), memo, now, stall, done[w["n"]])
            row = row._replace(foreign=foreign.get(w["n"], []), **telemetry(fleet, w["n"])._asdict())
            if memo.get("state") != row.state:
                log_event(fleet, "state", worker=w["n"], was=memo.get("state"), now=row.state)
                memo["state"] = row.state
            rows.append(row)
        memory["tally"] = tally_label(fleet, rows)
    return rows


def poll_by_n(fleet, flags=None):
    """poll(), as {n: Row}."""
    return {r.n: r for r in poll(fleet, flags=flags)}


# --- labels: what a person attached to a fleet sees ------------------------------
# Each pane's top border shows orch's own label, never the title a worker's agent
# sets: its task (W<n>, and its role and goal once briefed), set at spawn and at
# brief, and its state, set when a poll sees it change; the session's status line
# shows the fleet's tally. A change rides in the next poll's batch (a poll stays one
# tmux process), and `wait` shows its last poll's before it returns.

BORDER = " #{@orch_task} · #{@orch_state} "


def label_text(text, width=80):
    """Worker text as tmux shows it in a label: one_line(), '#' doubled (no
    format, style or #(command) of a worker's runs)."""
    return one_line(text, width).replace("#", "##")


def task_label(fleet, n):
    """Worker n's task for its label: W<n>, with its role and goal once briefed."""
    brief, _ = read_untrusted(worker_file(fleet, n, "task.md"))
    m = re.match(r"# Worker \d+ of \d+ — (.*) \((\w+)\)\s*$", (brief or "").split("\n", 1)[0])
    return label_text("W%d %s: %s" % (n, m.group(2).lower(), m.group(1)) if m else "W%d" % n)


def tally_label(fleet, rows):
    """The fleet's tally for its status line: done N/M, how many need the lead, the known cost."""
    need, total = sum(needs_lead(fleet, r) is not None for r in rows), fleet_cost(rows)[0]
    cost = "%s known" % money(total) if any(r.cost_usd is not None for r in rows) else "cost unknown"
    return label_text("orch %s: done %d/%d · %d need%s the lead · %s" % (
        fleet["name"], sum(r.done for r in rows), len(rows), need, "s" * (need == 1), cost))


def label_commands(fleet, memory):
    """The `;` batch tail that shows what changed since it was last shown (a
    pane's state, the fleet's tally), from watch.json's `memory`, marked shown."""
    argv = []
    for w in fleet["workers"]:
        memo = memory.get(str(w["n"]))
        if isinstance(memo, dict) and w["pane"] and isinstance(memo.get("state"), str) \
                and memo.get("label") != memo["state"]:
            # -q: a pane closed since the last poll must not stop the batch (tmux 3.3a stops at a failure)
            argv += [";", "set-option", "-q", "-p", "-t", w["pane"], "@orch_state", label_text(memo["state"])]
            memo["label"] = memo["state"]
    if isinstance(memory.get("tally"), str) and memory.get("tally_shown") != memory["tally"]:
        argv += [";", "set-option", "-t", "=%s:" % fleet["session"], "status-right", memory["tally"]]
        memory["tally_shown"] = memory["tally"]
    return argv


def show_labels(fleet):
    """Show now what the last poll changed: `wait` has no next poll to carry it."""
    with updating(fleet, "watch.json") as memory:
        argv = label_commands(fleet, memory)
        with contextlib.suppress(OrchError):        # the session is gone: nothing to show
            if argv:
                tmux(*argv[1:])


# --- delivery ------------------------------------------------------------------

def login_wall(fleet, r):
    """Why worker Row r will not get past its screen without the lead: a
    login screen of its agent's; None for any other."""
    w = fleet["workers"][r.n - 1]
    entry = AGENTS[w["profile"]]
    if r.shows != "dialog" or not re.search(entry.get("login_screen", r"(?!)"), r.screen or "", re.M):
        return None
    return "is at %s's login screen: %s (`orch doctor --agent %s` checks), then `orch respawn %s %d`" % (
        w["profile"], entry.get("login", "log in"), w["profile"], fleet["name"], r.n)


def refusal(fleet, n, state, row=None):
    """Why worker n (its Row, if known) cannot take a message now, and what to do about it."""
    name, wall = fleet["name"], row is not None and login_wall(fleet, row)
    return "W%d %s" % (n, wall or {
        "draft": "has unsent text in its input box: look with `orch read %s %d`; `orch nudge "
                 "%s %d MESSAGE` clears it first" % (name, n, name, n),
        "permission": "is waiting for a permission answer: answer it in the pane (`tmux attach "
                      "-t orch-%s`), then send again" % name,
        "dialog": "is at a dialog: look with `orch read %s %d` and answer it in the pane "
                  "(`tmux attach -t orch-%s`)" % (name, n, name),
        "limited": "hit a usage or rate limit: wait for the reset, or `orch respawn %s %d`" % (name, n),
        "exited": "has exited: `orch respawn %s %d` restarts it" % (name, n),
        "booting": "is still booting after %ds: look with `orch read %s %d`" % (BOOT_WAIT, name, n),
        "unknown": "shows a screen orch does not recognise, so orch types nothing into it: look with "
                   "`orch read %s %d`" % (name, n),
    }[state])


def ready_targets(fleet, ns, clear, limited=False):
    """Phase 1 of delivery: wait out booting (never type into a booting
    agent), clear drafts if asked; a limited worker is a target only when
    `limited` (its limit has reset); returns (rows, targets, {n: refusal})."""
    deadline = time.time() + BOOT_WAIT
    rows = poll_by_n(fleet)
    while any(rows[n].shows == "booting" for n in ns) and time.time() < deadline:
        time.sleep(0.2)
        rows = poll_by_n(fleet)
    failed, targets = {}, []
    for n in ns:
        for _ in range(20 if clear else 0):     # one line per round: multi-line drafts
            if rows[n].shows != "draft":
                break
            tmux("send-keys", "-t", rows[n].pane, *CLEAR_KEYS)
            time.sleep(0.1)
            rows[n] = poll_by_n(fleet)[n]
        shows = rows[n].shows
        if shows in PAST_BOOT and shows != "draft" or limited and shows == "limited":
            targets.append(n)
        else:
            failed[n] = refusal(fleet, n, shows, rows[n])
    return rows, targets, failed


def paste(panes, text):
    """Phase 2: one bracketed paste (-p) into every target pane, in one tmux
    process. The agent sees one paste, not keystrokes, so a newline inside
    never submits; Enter goes as a separate keystroke after. Never into a pane
    that died since the poll: tmux 3.3a crashes on that."""
    buf = "orch-" + os.urandom(4).hex()
    argv = ["load-buffer", "-b", buf, "-"]
    for pane in panes:
        argv += [";", "if-shell", "-F", "-t", pane, "#{?pane_dead,,1}",
                 "paste-buffer -p -b %s -t %s" % (buf, pane)]
    tmux(*(argv + [";", "delete-buffer", "-b", buf]), stdin=text.encode("utf-8"))


def submit(fleet, rows, targets, text):
    """Phase 3: Enter, confirmed from the screen: submitted once the input box
    is empty again and the screen moved on; Enter again while the text still
    sits in the box. Returns the targets it could not confirm, with rows and
    the Enters sent."""
    before = {n: rows[n].digest for n in targets}
    enters = {n: [0, 0.0] for n in targets}          # Enters sent, time of last
    entries = {w["n"]: AGENTS[w["profile"]] for w in fleet["workers"]}
    keys = {n: entries[n].get("queue_key", "Enter") if rows[n].shows == "busy" else "Enter"
            for n in targets}
    deadline = time.time() + 8 + len(text) / 2000.0
    pending, confirmed = set(targets), {}
    while pending and time.time() < deadline:
        now = time.time()
        for n in sorted(pending):
            count, last = enters[n]
            if count == 0 or (rows[n].shows == "draft" and now - last >= 1.0
                              and count <= ENTER_RETRIES):
                tmux("send-keys", "-t", rows[n].pane, keys[n])
                enters[n] = [count + 1, now]
        time.sleep(0.25)
        rows = poll_by_n(fleet)
        for n in list(pending):     # on two polls in a row: one frame may be caught mid-redraw
            if rows[n].shows not in ("draft", "booting", "exited", "dialog", "unknown") \
                    and rows[n].digest != before[n]:
                confirmed[n] = confirmed.get(n, 0) + 1
                if confirmed[n] == 2:
                    pending.discard(n)
            else:
                confirmed[n] = 0
    return pending, rows, {n: e[0] for n, e in enters.items()}


def deliver(fleet, messages, clear=False, limited=False):
    """Paste each worker's message ({n: text}) into its input box and submit them
    all at once, confirmed from the screen; returns {n: error} for the ones not reached."""
    messages = {n: clean_text(text) for n, text in messages.items()}
    if not all(text.strip() for text in messages.values()):
        raise OrchError("nothing to send: the message is empty", 2)
    rows, targets, failed = ready_targets(fleet, sorted(messages), clear, limited)
    for text in sorted({messages[n] for n in targets}):       # one paste per distinct text
        paste([rows[n].pane for n in targets if messages[n] == text], text)
    pending, rows, enters = submit(fleet, rows, targets, max(messages.values(), key=len))
    for n in targets:
        log_event(fleet, "send", worker=n, chars=len(messages[n]), enters=enters[n], confirmed=n not in pending)
        if n in pending:
            failed[n] = ("W%d: could not confirm delivery (%s after %d Enter presses): look with "
                         "`orch read %s %d`" % (n, rows[n].shows, enters[n], fleet["name"], n))
    return failed


def interrupt(fleet, ns):
    """Esc (every agent's interrupt key) to each busy worker of `ns`, then wait
    up to 10 s until none of them is busy: a message after it is not queued."""
    rows = poll_by_n(fleet)
    busy, deadline = [n for n in ns if rows[n].shows == "busy"], time.time() + 10
    for n in busy:
        tmux("send-keys", "-t", rows[n].pane, "Escape")
        log_event(fleet, "interrupt", worker=n)
    while busy and time.time() < deadline:
        time.sleep(0.2)
        rows = poll_by_n(fleet)
        busy = [n for n in busy if rows[n].shows == "busy"]


def send_text(fleet, ns, text, clear=False):
    """deliver() one text to workers `ns`: returns one line per worker reached;
    the failures raise, with the lines of the workers that were reached."""
    failed = deliver(fleet, dict.fromkeys(ns, text), clear)
    text = clean_text(text)
    lines = ["W%d: delivered %d line(s), %d chars" % (n, text.count("\n") + 1, len(text))
             for n in ns if n not in failed]
    if failed:
        raise OrchError("; ".join(failed[n] for n in sorted(failed)), said=lines)
    return lines


# --- waiting: the rules of `wait` -----------------------------------------------

RESUME = ("Your usage limit has reset. Retry the exact step you were on when the limit stopped you; "
          "do not work around it.")


def needs_lead(fleet, r, nudged_at=None, stall=STALL):
    """Why worker Row r needs the lead, and the orch command that helps; or
    None. `nudged_at` (when it was last nudged) makes a stall that the nudge
    did not end one."""
    name, n = fleet["name"], r.n
    if r.state in ("permission", "dialog"):
        return ("W%d waits at a %s: answer it in its pane (tmux attach -t orch-%s)" % (n, r.state, name),
                "orch attach %s" % name)
    if r.state == "unknown":
        return "W%d shows a screen orch does not recognise" % n, "orch read %s %d" % (name, n)
    if r.state == "exited":
        return "W%d exited without its done flag" % n, "orch respawn %s %d" % (name, n)
    if r.state == "limited" and r.resets is None:
        return "W%d hit a usage limit that does not say when it resets" % n, "orch read %s %d" % (name, n)
    if r.state == "stalled" and nudged_at and time.time() - nudged_at >= stall:
        return "W%d is still stalled %ds after its nudge" % (n, stall), "orch read %s %d" % (name, n)
    return None


def is_answer(p):
    """A bus Post that is the lead's: it answers every question before it."""
    return p.genuine and p.text.startswith("[lead]")


def lead_question(p):
    """A bus Post a worker addressed to the lead (`@lead`) as (its worker n,
    or None when orch did not write the line, and the line as shown), or None."""
    if "@lead" not in p.text or p.genuine and re.match(r"\[(lead|orch)\]", p.text):
        return None
    m = re.match(r"\[W(\d{1,6})\]", p.text) if p.genuine else None
    return int(m.group(1)) if m else None, one_line(shown(p), 300)


def unanswered(fleet):
    """The questions to the lead in the bus's last 16 MB that no line the lead
    posted followed, as (worker, why, command): for `status`."""
    path, pending = bus_path(fleet), []
    start = max(0, os.path.getsize(path) - READ_CAP) if os.path.isfile(path) else 0
    for p in bus_posts(fleet, start)[0][1 if start else 0:]:
        if is_answer(p):
            pending = []
        elif lead_question(p):
            pending.append(lead_question(p))
    return [(n, "W%s asks the lead on the bus: %s" % (n or "?", text), "orch bus %s --new" % fleet["name"])
            for n, text in pending]


def note_nudge(fleet, n, when):
    """Keep when worker n was last nudged (None: forget it) in watch.json, for
    every later wait; returns `when`."""
    with updating(fleet, "watch.json") as memory:
        if isinstance(memory.get(str(n)), dict):
            memory[str(n)]["nudged"] = when
    return when


def bus_answered(fleet):
    """The byte offset of the bus after the lead's last answer (0: none):
    where a `wait` with no cursor of its own starts looking for questions."""
    posts, end = bus_posts(fleet)
    return max([posts[i + 1].at if i + 1 < len(posts) else end for i, p in enumerate(posts) if is_answer(p)] or [0])


def wait_loop(fleet, flags, timeout, interval, stall, nudge, emit, budget=None, attention=False):
    """Poll until every worker in `flags` ({n: done-flag path}) has its flag,
    calling emit(Event) for each event: a state change or done flag, a bus
    line to the lead, a write into another worker's file, the fleet's cost at
    80 % of `budget`. Nudges a stalled worker once per stall (`nudge(n)` is
    the text, None: never) and resumes a limited one once its limit has reset.
    Returns 0 all done, 3 timed out, 4 a worker exited without its flag and,
    with `attention`, 6 once an event needs the lead; past `budget` (USD, the
    fleet's known cost) it interrupts every busy worker and raises."""
    deadline, began = time.time() + timeout if timeout else None, time.time()
    last, resumed, written, warned = {}, set(), set(), False
    with updating(fleet, "watch.json") as memory:        # nudges of earlier waits count: a loop of short waits
        nudged_at = {int(n): m["nudged"] for n, m in memory.items() if n.isdigit() and isinstance(m, dict)
                     and finite(m.get("nudged"))}
    while True:
        rows, events = poll(fleet, stall, flags), []
        total, spent = fleet_cost(rows) if budget is not None else (0, "")
        if budget is not None and total > budget:
            emit(Event("budget", None, None, None, "the fleet's known cost is %s, past --budget $%.2f" % (
                spent, budget), "over budget: every busy worker was interrupted", "orch status %s" % fleet["name"]))
            interrupt(fleet, [r.n for r in rows])
            log_event(fleet, "budget", budget=budget, cost=total)
            raise OrchError("over budget: the fleet's known cost is %s, past --budget $%.2f: every busy "
                            "worker was interrupted" % (spent, budget), 5)
        if budget is not None and total >= 0.8 * budget and not warned and any(r.cost_usd is not None for r in rows):
            warned = True
            events.append(Event("budget", None, None, None, "the fleet's known cost is %s: at least 80%% of "
                                "--budget $%.2f" % (spent, budget), None, None))
        for w, files in sorted(foreign_writes(fleet, began).items()):
            for o, f in [x for x in files if (w,) + x not in written]:
                written.add((w, o, f))
                events.append(Event("foreign", w, None, None, "W%d wrote %s's %s" % (
                    w, "W%d" % o if o else "orch", one_line(os.path.relpath(f, shared_dir(fleet)), 200)), None, None))
        merge_outboxes(fleet)
        with updating(fleet, "watch.json") as memory:      # each question once, whoever waits
            start, size = memory.get("bus_read"), os.path.getsize(bus_path(fleet)) if os.path.isfile(
                bus_path(fleet)) else 0
            if type(start) is not int or not 0 <= start <= size:       # none yet, damaged, or bus.md shrank
                start = bus_answered(fleet)
            posts, memory["bus_read"] = bus_posts(fleet, start)
        events += [Event("bus", q[0], None, None, q[1], "W%s asks the lead on the bus" % (q[0] or "?"),
                         "orch bus %s --new" % fleet["name"]) for q in map(lead_question, posts) if q]
        rows = [r for r in rows if r.n in flags]
        for r in rows:
            why = needs_lead(fleet, r, nudged_at.get(r.n), stall)
            if last.get(r.n) != r.state or why and r.state == "stalled":
                events.append(Event("done" if r.state == "done" else "state", r.n, r, last.get(r.n), None,
                                    *(why or (None, None))))
                if r.state == "done" and flags[r.n] == worker_file(fleet, r.n, "done"):
                    result_of(fleet, r.n)       # orch's copy, from now on
                last[r.n] = r.state
                if why and r.state == "stalled":    # a stall the nudge did not end: said once, then nudged anew
                    nudged_at[r.n] = note_nudge(fleet, r.n, None)
            if r.state != "limited":
                resumed.discard(r.n)
            if nudge and r.state == "stalled" and (nudged_at.get(r.n) or 0) < time.time() - r.quiet \
                    and not (attention and why):        # once per stall, whichever wait sees it
                deliver(fleet, {r.n: nudge(r.n)}, clear=True)
                nudged_at[r.n] = note_nudge(fleet, r.n, time.time())
                log_event(fleet, "nudge", worker=r.n, why="stalled")
            elif nudge and r.state == "limited" and r.n not in resumed and time.time() >= (r.resets or float("inf")):
                resumed.add(r.n)              # a limit that has reset, once; never before
                deliver(fleet, {r.n: RESUME}, clear=True, limited=True)
                log_event(fleet, "resume", worker=r.n)
        for e in events:
            emit(e)
        code = 0 if all(r.state == "done" for r in rows) else 4 if any(r.state == "exited" for r in rows) \
            else 6 if attention and any(e.why for e in events) else 3 if deadline and time.time() >= deadline \
            else None
        if code is not None:
            show_labels(fleet)
            return code
        time.sleep(max(0.0, min(interval, deadline - time.time())) if deadline else interval)


def offline_row(fleet, w, foreign=()):
    """Worker w's Row without a look at its pane (its fleet is not live, or
    for the report): done or exited, and its Telemetry."""
    done = is_done(fleet, w["n"])
    return Row(n=w["n"], pane=w["pane"], shows=None, state="done" if done else "exited", done=done, quiet=None,
               last="", screen="", digest=None, resets=None, foreign=list(foreign), **telemetry(fleet, w["n"])._asdict())


def money(usd, unknown="unknown"):
    return unknown if usd is None else "$%.2f" % usd


def percent(pct, unknown="unknown"):
    return unknown if pct is None else "%d%%" % pct


def fleet_cost(rows):
    """The fleet's known cost (USD) and how status and report say it."""
    known = {r.n: r.cost_usd for r in rows if r.cost_usd is not None}
    total, unknown = sum(known.values()), [r.n for r in rows if r.n not in known]
    said = money(total)
    if known:
        said += " (%s)" % ", ".join("W%d %s" % (n, money(usd)) for n, usd in sorted(known.items()))
    if unknown:
        said += "; unknown for " + ", ".join("W%d" % n for n in unknown)
    return total, said


def event_line(e, json_mode=False):
    """wait's line for one Event: JSON, or text for a person."""
    if json_mode:
        out = {"t": now_iso(), "event": e.kind, "worker": e.n, "attention": bool(e.why)}
        if e.row:
            out.update(was=e.was, state=e.row.state, last=e.row.last, resets=e.row.resets,
                       cost_usd=e.row.cost_usd, context_pct=e.row.context_pct)
        else:
            out["text"] = e.text
        if e.why:
            out.update(why=e.why, command=e.command)
        return safe_json(out)
    said = "W%d %s -> %s%s" % (e.n, e.was or "-", e.row.state, "  | " + defang(e.row.last[:80])
                                if e.row.last else "") if e.row else "%s%s" % ("W%s " % e.n if e.n else "", one_line(e.text, 300))
    return "%s %s%s" % (time.strftime("%H:%M:%S"), said, "  ** needs the lead: %s: `%s`" % (e.why, e.command)
                        if e.why else "")


def default_nudge(fleet, n, brief=None, k=None):
    """The reminder of worker n's brief (`brief`: a round's, for round k)."""
    brief, stem = brief or worker_file(fleet, n, "task.md"), worker_file(fleet, n, "r%d" % k if k else "")
    task = ("Your brief is %s - reread it." % brief if os.path.exists(brief)
            else "Finish what you were asked to do.")            # never a brief that is not there
    return ("Reminder: you are worker %d of %d. %s Write your deliverable to %s, then "
            "touch %s last. Work autonomously: do not wait for confirmation."
            % (n, len(fleet["workers"]), task, stem + ".result.md" if k else stem + "result.md",
               stem + ".done" if k else stem + "done"))


# --- isolation: a sandbox per worker --------------------------------------------
# Where bubblewrap runs, each worker's agent runs inside it: the whole filesystem
# read-only but the worker's own folder (shared/w<n>), its agent config and state
# (workers/w<n>) and a private /tmp; the tmux server's socket hidden; the network
# and the process tree as they are (kill ends it all). Without it, orch's own
# record still keeps what it read and verified (README: what that cannot stop).

ISOLATION_FIX = "install bubblewrap (apt-get install bubblewrap, dnf install bubblewrap)"


def isolation():
    """Whether workers can run sandboxed here: (True, "bubblewrap <version>"),
    or (False, why not and how to fix it)."""
    import shutil
    import subprocess
    bwrap = shutil.which("bwrap")
    if not bwrap:
        return False, "bubblewrap (bwrap) is not installed: %s" % ISOLATION_FIX
    try:
        probe = subprocess.run([bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
                                "--unshare-pid", "--die-with-parent", "--", "true"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=10)
        said = probe.stderr.decode("utf-8", "replace").strip().split("\n")[-1][:200]
        version = subprocess.run([bwrap, "--version"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 timeout=10).stdout.decode("utf-8", "replace").strip()
    except (OSError, subprocess.SubprocessError) as e:
        probe, said, version = None, str(e), ""
    if not probe or probe.returncode:
        return False, "bubblewrap cannot start a sandbox here (%s): allow unprivileged user namespaces " \
                      "(sysctl kernel.unprivileged_userns_clone=1), or run where they are" % defang(said)
    return True, version or "bubblewrap"


def bwrap_argv(argv, env, reads, writes, chdir):
    """argv inside a bubblewrap sandbox: the filesystem read-only, a private
    /tmp and /run/user/<uid>, what it reads under those (`reads`) bound back
    read-only, `writes` writable, the tmux server's socket directory hidden
    under an empty one (TMUX leaves `env`), and a process namespace of its own."""
    import shutil
    bwrap = shutil.which("bwrap")
    if not bwrap:
        raise OrchError("this fleet runs its workers isolated, and bwrap is gone: %s, or start the fleet again "
                        "with --no-isolate" % ISOLATION_FIX)
    # A private /tmp, and the session's sockets hidden (D-Bus: systemd-run; ssh and gpg agents).
    hidden = ["/tmp"] + [d for d in ["/run/user/%d" % os.getuid()] if os.path.isdir(d)]
    args = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for d in hidden:
        args += ["--tmpfs", d]
    for path in sorted({os.path.realpath(p) for p in reads if p and os.path.isabs(p) and os.path.exists(p)}, key=len):
        args += ["--ro-bind", path, path] if any(path == d or path.startswith(d + "/") for d in hidden) else []
    for path in writes:
        args += ["--bind", os.path.realpath(path), os.path.realpath(path)]
    socket = (env.pop("TMUX", None) or "").split(",")[0]
    env.pop("TMUX_PANE", None)
    servers = os.path.join(os.environ.get("TMUX_TMPDIR") or "/tmp", "tmux-%d" % os.getuid())   # where tmux puts it
    for d in sorted({os.path.dirname(os.path.realpath(socket)) if socket else None, os.path.realpath(servers)} - {None}):
        args += ["--tmpfs", d] if os.path.isdir(d) else []
    return args + ["--unshare-pid", "--die-with-parent", "--chdir", os.path.realpath(chdir), "--"] + argv


def sandboxed(fleet, w, argv, env):
    """argv, run inside worker w's sandbox: what it reads under the hidden
    directories (the workdir, the run dir, orch, HOME, PATH) bound read-only
    into them, then its two folders writable (and, in a write fleet, what its
    git needs to commit in its worktree)."""
    import shutil
    found = shutil.which(argv[0], path=env.get("PATH"))
    # orch's compiled copies (own_argv): a Claude worker's hooks name the one of when the fleet began
    reads = [fleet["workdir"], fleet["run"], ORCH, os.path.join(orch_home(), "cache"), env.get("HOME"),
             found and os.path.dirname(os.path.realpath(found))]
    reads += env.get("PATH", "").split(os.pathsep) + argv[1:]      # and the files its command line names
    writes = AGENTS[w["profile"]].get("writes", lambda fleet, w: [])(fleet, w)
    for path in [worker_dir(fleet, w["n"]), state_dir(fleet, w["n"])] + writes:
        os.makedirs(path, mode=0o700, exist_ok=True)
    writes = [worker_dir(fleet, w["n"]), state_dir(fleet, w["n"])] + writes
    if fleet.get("git"):                # its worktree, its git metadata in it; the repository read-only
        reads += [fleet["git"]["repo"], fleet["git"]["gitdir"]]
        writes.append(worktree_of(fleet, w["n"]))
    return bwrap_argv(argv, env, reads, writes, workdir_of(fleet, w["n"]))


# --- write fleets: git worktrees, snapshots, checks -----------------------------
# In a write fleet (spawn --worktrees) worker n edits a worktree of its own,
# runs/<name>/worktrees/w<n>: a clone of the repository that borrows its
# objects (git clone --shared), on the branch orch/<name>/w<n> at the fleet's
# base. Its git metadata is its own, inside it: a sandboxed worker commits
# there and writes nothing of the repository's .git, neither its objects nor
# its branches. orch reads a change with git itself from the worktree's files,
# never from the worker's word or branch: a snapshot is a commit of those
# files on base, in the repository, under refs/orch/<name>/w<n>, and that
# commit is what is verified, checked and merged. orch's own git names the
# repository's git dir (never a .git a worker or the code under check can
# rewrite), runs no hook, no fsmonitor and no gc, and signs nothing.

GIT_SAFE = ["-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "commit.gpgSign=false",
            "-c", "gc.auto=0", "-c", "core.quotePath=true", "-c", "core.pager=cat"]
CHECK_TAIL = 20                 # lines of a check's output the matrix keeps
FILE_CAP = 64 << 20             # bytes of one file of a change orch takes (a sparse 4 GB file costs no disk)
ORCH_IDENTITY = {"GIT_AUTHOR_NAME": "orch", "GIT_AUTHOR_EMAIL": "orch@localhost",
                 "GIT_COMMITTER_NAME": "orch", "GIT_COMMITTER_EMAIL": "orch@localhost"}

# A worker's change as git sees it against base: how many files it touches and
# lines it adds and removes, and the paths to flag: binary files, deleted
# files, links out (a symlink whose target is absolute or climbs with '..',
# a submodule, whose content is not in the change), files outside its scopes;
# and the paths it touches (the first FINDINGS_CAP), as text a terminal shows.
Change = collections.namedtuple("Change", "files added removed binary deleted escapes outside paths")


def lead_env():
    """The lead's environment without its GIT_* variables (a GIT_DIR would send git elsewhere)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}


def git(cwd, *args, env=None, codes=(0,), stdin=None, gitdir=None, tree=None, timeout=None):
    """git args in `cwd` (a repository named by `gitdir`, with `tree` as its
    work tree, when given), never through a shell, with the lead's GIT_*
    variables dropped, fed `stdin` (text), for at most `timeout` seconds where
    it reads what a worker can change; its stdout as text (surrogates for
    undecodable bytes). A failure is one OrchError line naming the command."""
    import subprocess
    argv = ["git"] + (["--git-dir", gitdir] if gitdir else []) + (["--work-tree", tree] if tree else []) + GIT_SAFE
    try:
        p = subprocess.run(argv + list(args), cwd=cwd, env=dict(lead_env(), **(env or {})), input=(stdin or "").encode(
            "utf-8", "surrogateescape"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OrchError("`git %s` took more than %gs: it stopped" % (one_line(" ".join(args), 120), timeout))
    except OSError as e:                # git is there, the directory is not (or not for us)
        import shutil
        raise OrchError("cannot run git in %s: %s" % (cwd, e.strerror) if shutil.which("git")
                        else "cannot run git: %s: install git" % e.strerror)
    if p.returncode not in codes:
        said = p.stderr.decode("utf-8", "replace").strip().splitlines()
        raise OrchError("`git %s` failed (exit %d)%s" % (one_line(" ".join(args), 120), p.returncode,
                                                         ": " + one_line(said[-1], 200) if said else ""))
    return (p.stdout or b"").decode("utf-8", "surrogateescape")


def identity(repo):
    """The committer orch's commits carry: the user's where git has one, else orch."""
    return {} if git(repo, "config", "user.email", codes=(0, 1)).strip() else ORCH_IDENTITY


def repository(workdir):
    """The git facts of a write fleet's workdir: its repository's top level,
    git dir, the workdir's place in it, and HEAD; a clear error (exit 2) where
    there is none."""
    said = git(workdir, "rev-parse", "--show-toplevel", "--git-common-dir", "--show-prefix", codes=(0, 128))
    lines = said.split("\n")
    if len(lines) < 3 or not lines[0]:
        raise OrchError("--worktrees: %s is not in a git repository: `git init` and commit it there first, "
                        "or spawn without --worktrees" % workdir, 2)
    head = git(workdir, "rev-parse", "--verify", "-q", "HEAD^{commit}", codes=(0, 1)).strip()
    if not head:
        raise OrchError("--worktrees: the repository %s has no commit yet: commit once, then spawn" % lines[0], 2)
    return {"repo": lines[0], "gitdir": os.path.realpath(os.path.join(workdir, lines[1])),
            "prefix": lines[2], "base": head}


def branch_of(fleet, n):
    return "orch/%s/w%s" % (fleet["name"], n)


def worktree_of(fleet, n):
    return os.path.join(fleet["run"], "worktrees", "w%s" % n)


def workdir_of(fleet, n):
    """Worker n's workdir: its worktree (where the lead's workdir lies in it) in a write fleet."""
    if not fleet.get("git"):
        return fleet["workdir"]
    return os.path.join(worktree_of(fleet, n), fleet["git"]["prefix"]).rstrip("/")


def add_worktree(fleet, n):
    """Worker n's worktree: a clone borrowing the repository's objects, on a new branch at base."""
    g, path = fleet["git"], worktree_of(fleet, n)
    if os.path.lexists(path):
        raise OrchError("%s already exists: W%d's worktree must be new (`orch clean %s` removes old ones)"
                        % (path, n, fleet["name"]))
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    git(g["repo"], "clone", "-q", "--shared", "--no-checkout", g["gitdir"], path)
    git(path, "checkout", "-q", "-b", branch_of(fleet, n), g["base"])


def admin_dir(fleet, tree):
    """The admin dir of worktree `tree` in the git dir, found from git's own
    record of it (each admin dir's gitdir file), never from the tree's .git
    file, which whoever works in the tree can rewrite; None if git has none."""
    root, want = os.path.join(fleet["git"]["gitdir"], "worktrees"), os.path.join(os.path.realpath(tree), ".git")
    for d in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if os.path.realpath(read_text(os.path.join(root, d, "gitdir"), "").strip() or "/") == want:
            return os.path.join(root, d)
    return None


def in_tree(fleet, tree):
    """git() arguments that work in worktree `tree` through its admin dir, not its .git file."""
    admin = admin_dir(fleet, tree)
    if not admin:
        raise OrchError("%s is no worktree git knows of (`git worktree list` shows them)" % tree)
    return {"gitdir": admin, "tree": tree}


def worktree_walk(tree, files=False):
    """Every entry of a worktree under its own .git's level, as (relative
    path, lstat), never following a link; a directory it cannot open raises
    (a change there would pass for none), one gone meanwhile is skipped.
    Without `files`, only what git would read past its own checks: what
    lies in a nested .git."""
    def fail(e):
        raise OrchError("%s cannot be read: %s" % (defang(os.path.relpath(e.filename, tree)), e.strerror))
    for root, dirs, names in os.walk(tree, onerror=fail):
        dirs[:] = [d for d in dirs if root != tree or d != ".git"]
        for name in [x for x in dirs + names if root != tree or x != ".git"]:   # its own .git: git skips it
            with contextlib.suppress(FileNotFoundError):
                at = os.lstat(os.path.join(root, name))
                if files or name.lower() == ".git":
                    yield os.path.relpath(os.path.join(root, name), tree), at


def change_tree(fleet, n):
    """The tree of worker n's worktree as its files are now (tracked, changed
    and untracked, ignored files aside), through an index of orch's own: the
    worker's index, branch and files are not touched. First, without git: no
    nested repository (git would read its HEAD, which can be a FIFO), and no
    file git would take past FILE_CAP bytes, or sparse (4 GB that cost no disk)."""
    g = fleet["git"]
    index = os.path.join(own_dir(os.path.join(fleet["run"], "git")), "w%d.index" % n)
    env, tree = {"GIT_INDEX_FILE": index}, worktree_of(fleet, n)
    here = {"env": env, "gitdir": g["gitdir"], "tree": tree, "timeout": 600}
    if os.path.islink(tree) or not os.path.isdir(tree):
        raise OrchError("W%d's worktree %s is %s" % (n, tree, "a link now" if os.path.islink(tree) else "gone"))
    for rel, _ in worktree_walk(tree):
        raise OrchError("it holds a repository of its own at %s: orch takes no nested repository" % defang(rel))
    ignored = git(tree, "ls-files", "-z", "-o", "-i", "--exclude-standard", "--directory", **here).split("\0")
    for rel, at in worktree_walk(tree, files=True):
        if stat.S_ISREG(at.st_mode) and at.st_size > 1 << 20 and not any(
                rel == x.rstrip("/") or x.endswith("/") and rel.startswith(x) for x in ignored if x):
            if at.st_size > FILE_CAP or at.st_blocks * 512 < at.st_size // 2:
                raise OrchError("%s is %d MB%s, past what orch takes of one file (%d MB, on disk)" % (
                    defang(rel), at.st_size >> 20, " but sparse" if at.st_size <= FILE_CAP else "", FILE_CAP >> 20))
    if not os.path.exists(index):
        git(tree, "read-tree", g["base"], **here)
    git(tree, "add", "-A", "--", ".", **here)
    return git(tree, "write-tree", **here).strip()


def change_of(fleet, n, new, scope=None):
    """Change: tree-ish `new` against base (scope: the worker's scopes, repo-relative)."""
    g = fleet["git"]
    raw = git(g["repo"], "diff-tree", "-r", "-z", "--no-renames", "--raw", "--numstat", g["base"], new).split("\0")
    files, added, removed, binary, deleted, escapes, i = 0, 0, 0, [], [], [], 0
    links, paths = [], []
    while i < len(raw) - 1:
        head = raw[i]
        if head.startswith(":"):            # :old new sha sha status, then the path
            mode, sha, status, path = head.split()[1], head.split()[3], head.split()[4], raw[i + 1]
            paths.append(path)
            if status == "D":
                deleted.append(path)
            elif mode in ("120000", "160000"):
                links.append((path, sha if mode == "120000" else None))
            i += 2
        else:                               # added<TAB>removed<TAB>path
            a, r, path = (head.split("\t", 2) + ["", ""])[:3]
            files += 1
            if a == "-":
                binary.append(path)
            else:
                added, removed = added + int(a), removed + int(r)
            i += 1
    for path, sha in links:
        target = git(g["repo"], "cat-file", "blob", sha) if sha else "a submodule"
        if not sha or os.path.isabs(target) or {"..", ".git"} & set(target.lower().split("/")):
            escapes.append("%s -> %s" % (path, target))
    escapes += ["%s: it changes how git checks out and merges" % p for p in paths   # merge=union, filters
                if os.path.basename(p).lower() in (".gitattributes", ".gitmodules")]
    outside = sorted({p for p in paths if scope and not any(in_scope(p, s) for s in scope)})
    shown = lambda ps: [p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for p in ps]
    return Change(files, added, removed, shown(binary), shown(deleted), shown(escapes), shown(outside),
                  shown(paths[:FINDINGS_CAP]))


def worker_objects(fleet, n):
    """Worker n's object store, once orch has seen that git can read it
    without blocking or leaving it: directories and regular files only, its
    alternates only the repository's own. Raises what is wrong."""
    store = os.path.join(worktree_of(fleet, n), ".git", "objects")
    if os.path.islink(os.path.dirname(store)) or os.path.islink(store) or not os.path.isdir(store):
        raise OrchError("W%d's .git/objects is not a directory of its own" % n)
    for root, dirs, names in os.walk(store):
        for name in dirs + names:
            mode = os.lstat(os.path.join(root, name)).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise OrchError("W%d's .git/objects holds %s, which is no file" % (n, defang(name)))
    said, why = read_untrusted(os.path.join(store, "info", "alternates"))
    if why or any(os.path.realpath(os.path.join(store, x.strip())) != os.path.join(fleet["git"]["gitdir"], "objects")
                  for x in (said or "").split("\n") if x.strip()):     # relative to the store, as git reads it
        raise OrchError("W%d's .git/objects borrows from elsewhere than the repository" % n)
    return store


def worker_tips(fleet, n):
    """Every commit worker n's clone names as its own: HEAD, each branch
    (loose or packed), each stash; not the repository's branches and tags
    that cloning copied. Read as text (regular files only, never through its
    git, whose config is the worker's); a file that cannot be read raises."""
    root, tips = os.path.join(worktree_of(fleet, n), ".git"), set()
    if os.path.islink(root) or not os.path.isdir(root):
        raise OrchError("W%d's .git is not a directory" % n)
    files = [os.path.join(root, x) for x in ("HEAD", "refs/stash", "logs/refs/stash")]
    for top, _, names in os.walk(os.path.join(root, "refs", "heads")):
        files += [os.path.join(top, x) for x in names]
    packed = [line for line in (read_untrusted(os.path.join(root, "packed-refs"))[0] or "").split("\n")
              if re.match(r"[0-9a-f]{40,64} refs/(heads/|stash$)", line)]
    for path in files:
        text, why = read_untrusted(path)
        if why:
            raise OrchError("W%d's %s %s" % (n, os.path.relpath(path, root), why))
        tips.update(re.findall(r"\b[0-9a-f]{40}(?:[0-9a-f]{24})?\b", text or ""))
    tips.update(line.split()[0] for line in packed)
    if len(tips) > FINDINGS_CAP:
        raise OrchError("W%d's clone names %d commits" % (n, len(tips)))
    return tips


def tip_trees(fleet, n):
    """The trees of the commits worker n's clone names (worker_tips); a commit
    git cannot find there counts as None: work orch cannot prove merged."""
    lend = {"env": {"GIT_ALTERNATE_OBJECT_DIRECTORIES": worker_objects(fleet, n)}, "timeout": 60}
    said = git(fleet["git"]["repo"], "cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize)",
               stdin="".join(t + "\n" for t in sorted(worker_tips(fleet, n))), **lend).split("\n")
    small = [row.split()[0] for row in said if re.match(r"\S+ commit \d{1,6}$", row)]   # at most a MB: git
    # reads a commit whole to peel it; any other tip (missing, huge, no commit) is work orch cannot judge
    trees = git(fleet["git"]["repo"], "cat-file", "--batch-check=%(objectname) %(objecttype)", stdin="".join(
        "%s^{tree}\n" % t for t in small), **lend) if small else ""
    return {row.split()[0] if row.endswith(" tree") else None for row in trees.splitlines()} | (
        {None} if len(small) < len([row for row in said if row]) else set())


def in_scope(path, scope):
    return path == scope.rstrip("/") or path.startswith(scope.rstrip("/") + "/") or scope in ("", ".")


def scope_of(fleet, w, rel=False):
    """Worker w's scopes as its last brief set them (scopes.json, orch's own),
    relative to the repository (rel: to the workdir, as the lead gave them)."""
    given = read_state(os.path.join(fleet["run"], "scopes.json")).get(str(w["n"]))
    given = [x for x in given if isinstance(x, str)] if isinstance(given, list) else []
    prefix = "" if rel else (fleet.get("git") or {}).get("prefix", "")
    return [os.path.normpath(prefix + x) for x in given]


def change_line(c):
    """A Change as status and the matrix show it."""
    flags = ["binary: " + ", ".join(c.binary)] * bool(c.binary) + ["deletes: " + ", ".join(c.deleted)] * bool(
        c.deleted) + ["links out: " + ", ".join(c.escapes)] * bool(c.escapes) + [
        "OUT OF SCOPE: " + ", ".join(c.outside)] * bool(c.outside)
    if not c.files:
        return "none"
    return defang(one_line("%d file(s) +%d -%d%s" % (c.files, c.added, c.removed, "".join(
        " | " + x for x in flags)), 300))


def snapshot_change(fleet, w, summary):
    """Worker w's change as a commit of orch's (parent: base) under
    refs/orch/<name>/w<n>, and its diff in shared/changes/w<n>.diff (at most
    READ_CAP bytes); returns (commit, Change), or None for no change."""
    g, n = fleet["git"], w["n"]
    tree = change_tree(fleet, n)
    if tree == git(g["repo"], "rev-parse", g["base"] + "^{tree}").strip():
        return None
    message = "orch: W%d's change in fleet %s, as verify found it\n\nW%d says: %s\n" % (n, fleet["name"], n, summary)
    commit = git(g["repo"], "commit-tree", tree, "-p", g["base"], "-m", defang(message),
                 env=identity(g["repo"])).strip()
    if not intact(fleet, commit):       # an object it reuses was planted under the name of other content
        raise OrchError("its snapshot %s does not hold what its worktree holds: an object in %s was "
                        "rewritten (a worker can write the object store): run `git fsck`" % (commit[:12], g["gitdir"]))
    ref = "refs/orch/%s/w%d" % (fleet["name"], n)
    old = git(g["repo"], "rev-parse", "--verify", "-q", ref, codes=(0, 1)).strip()
    if old and old != commit:           # an earlier snapshot (a fleet of that name before) stays reachable
        git(g["repo"], "update-ref", "refs/orch/%s/old/%s" % (fleet["name"], old), old)
    git(g["repo"], "update-ref", ref, commit)
    changes = own_dir(os.path.join(shared_dir(fleet), "changes"))
    path = os.path.join(changes, "w%d.diff" % n)
    archive(path) if os.path.lexists(path) else None
    write_diff(g["repo"], g["base"], commit, path)
    return commit, change_of(fleet, n, commit, scope_of(fleet, w))


def intact(fleet, commit):
    """Whether every object `commit` adds to base still hashes to its name.
    git does not check that when it reads a loose object, and a worker with
    no sandbox can write the object store: one could give a snapshot's id
    other content after orch made it. Read as a stream, a piece at a time."""
    import hashlib
    import subprocess
    import tempfile
    g = fleet["git"]
    names = git(g["repo"], "rev-list", "--objects", "--no-object-names", commit, "--not", g["base"]).split()
    with tempfile.TemporaryFile() as ask:
        ask.write("".join(x + "\n" for x in names).encode())
        ask.seek(0)
        p = subprocess.Popen(["git"] + GIT_SAFE + ["cat-file", "--batch"], cwd=g["repo"], stdin=ask,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             env=lead_env())
    try:
        for name in names:
            said = p.stdout.readline().split()
            if len(said) != 3 or said[0].decode() != name:
                return False
            left = int(said[2])
            digest = (hashlib.sha256 if len(name) == 64 else hashlib.sha1)(b"%s %d\0" % (said[1], left))
            while left:
                piece = p.stdout.read(min(left, 1 << 20))
                if not piece:
                    return False
                digest.update(piece)
                left -= len(piece)
            if p.stdout.read(1) != b"\n" or digest.hexdigest() != name:
                return False
        return True
    finally:
        p.kill()
        p.wait()


def write_diff(repo, old, new, path):
    """`git diff old new` into path, cut at READ_CAP bytes (a note says where)."""
    import subprocess
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        p = subprocess.Popen(["git"] + GIT_SAFE + ["diff", "--no-color", "--no-ext-diff", "--no-textconv", old, new], cwd=repo, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             env=lead_env())
        left = READ_CAP
        while left > 0:
            chunk = p.stdout.read(min(left, 1 << 16))
            if not chunk:
                break
            f.write(chunk)
            left -= len(chunk)
        if left <= 0:
            f.write(b"\n[orch: the diff is cut at %d bytes: `git diff %s %s` shows it whole]\n" % (READ_CAP, old.encode(),
                                                                                                   new.encode()))
        p.kill()
        p.wait()


def detached(fleet, label, commit):
    """A clean detached worktree of `commit`, runs/<name>/worktrees/<label>,
    made anew (it is orch's: nobody's work is in it)."""
    path = os.path.join(fleet["run"], "worktrees", label)
    drop_tree(fleet, path)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    git(fleet["git"]["repo"], "worktree", "add", "-q", "--detach", path, commit)
    return path


def drop_tree(fleet, path):
    """Remove a worktree (or worker clone) of the fleet's, and its admin dir
    only, never another's (no repository-wide prune: the lead's worktrees are
    the lead's). What cannot be removed (code under check took its write
    bits away) gets them back, or is moved aside: returns where, or None."""
    import shutil
    admin = admin_dir(fleet, path)
    if os.path.islink(path):
        os.unlink(path)
    for root, dirs, _ in os.walk(path) if os.path.isdir(path) else ():
        for d in [root] + [os.path.join(root, x) for x in dirs if not os.path.islink(os.path.join(root, x))]:
            with contextlib.suppress(OSError):
                os.chmod(d, 0o700)
    shutil.rmtree(path, ignore_errors=True)
    aside = archive(path) if os.path.lexists(path) else None
    if admin:
        shutil.rmtree(admin, ignore_errors=True)
    return aside


def run_check(fleet, tree, argv, timeout):
    """The lead's check command in `tree` (no shell; in a sandbox where the
    fleet's workers have one: it runs a worker's code): (exit status, its last
    lines), status None when it ran out of time."""
    import subprocess
    env = lead_env()
    where = os.path.join(tree, fleet["git"]["prefix"])      # the lead's workdir, within the repository
    if fleet.get("isolate"):
        argv = bwrap_argv(argv, env, reads=[tree], writes=[tree], chdir=where)
    try:
        p = subprocess.Popen(argv, cwd=where, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return 127, "cannot run %s: %s" % (argv[0], e.strerror)
    try:
        said, code = p.communicate(timeout=timeout)[0], p.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(p.pid, 9)
        said, code = p.communicate()[0], None
    tail = said[-65536:].decode("utf-8", "replace").rstrip().split("\n")[-CHECK_TAIL:]
    return code, defang("\n".join(tail))


def check_word(code):
    return "timed out" if code is None else "passes" if code == 0 else "fails (exit %d)" % code


# --- fleets --------------------------------------------------------------------

def profile_of(agent):
    """The AGENTS name for an --agent value ('sim --lie 2' -> 'sim'), or
    'generic' for any other command line."""
    import shlex
    try:
        words = shlex.split(agent or "")
    except ValueError as e:
        raise OrchError("bad --agent %r: %s" % (agent, e), 2)
    if not words:
        raise OrchError("empty --agent: name an agent (%s) or a command"
                        % ", ".join(k for k in AGENTS if k != "generic"), 2)
    return words[0] if words[0] in AGENTS and words[0] != "generic" else "generic"


def agent_binary(agent):
    """The program an --agent value runs and where it is on PATH (None: not
    found); orch's own for the agents it runs itself (sim)."""
    import shlex
    import shutil
    word = shlex.split(agent)[0]
    return word, ORCH if "command" in AGENTS[profile_of(agent)] else shutil.which(word)


def checked_profile(agent):
    """profile_of(agent), for an agent that must start now: on PATH."""
    profile = profile_of(agent)
    word, found = agent_binary(agent)
    if not found:
        raise OrchError("agent command %r not found on PATH: install it, or pass --agent sim "
                        "for a dry run" % word)
    return profile


def save_env(fleet):
    """The lead's environment for the panes, in env.json (0600): never on a command line."""
    write_json(os.path.join(fleet["run"], "env.json"), {
        k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE", "TERM", "COLUMNS", "LINES")})


def pane_command(fleet, n):
    """The start directory and command of worker n's pane."""
    # -c is a tmux format: a '#' in the workdir must not expand.
    return ["-c", workdir_of(fleet, n).replace("#", "##")] + own_argv() + ["worker",
            fleet["name"], str(n), "--home", orch_home()]


def open_pane(fleet, n, beside=None):
    """A pane running `orch.py worker <name> <n>`: split beside pane `beside`
    and retiled, else in a new window (or the session, if there is none)."""
    # An explicit target: run from inside tmux, the batch's current pane after a
    # detached new-session is the caller's own (the lead's), not the new one.
    new = [] if beside else ["-t", "=%s:" % fleet["session"]]
    argv = ["-P", "-F", "#{pane_id}"] + pane_command(fleet, n)     # tagged and labelled in the same batch
    for option in (["@orch_worker", pane_tag(fleet, n)], ["@orch_task", task_label(fleet, n)],
                   ["@orch_state", "booting"]):
        argv += [";", "set-option", "-p"] + new + option
    if beside:
        return tmux("split-window", "-t", beside, *argv, ";", "select-layout", "tiled").split()[0]
    # remain-on-exit in the same batch as the window's birth: a pane whose
    # agent dies at once still keeps its last screen; window-size manual: a
    # client that attaches (an 80x24 terminal) never resizes the panes orch reads;
    # each pane's top border shows orch's label of it (labels, above).
    for option in (["remain-on-exit", "on"], ["window-size", "manual"], ["pane-border-status", "top"],
                   ["pane-border-format", BORDER], ["automatic-rename", "off"]):     # no worker-chosen name
        argv += [";", "set-option", "-w"] + new + option
    argv += [";", "resize-window"] + new + ["-x", "200", "-y", "50"]     # born while a client looks
    if fleet["session"] in live_sessions():
        return tmux("new-window", "-t", "=%s:" % fleet["session"], *argv).split()[0]
    # The session carries its ORCH_HOME: a fleet of the same name in another
    # home must never be killed from this one.
    session = "=%s:" % fleet["session"]
    return tmux("new-session", "-d", "-s", fleet["session"], "-x", "200", "-y", "50", *argv,
                ";", "set-option", "-t", session, "@orch_home", orch_home(),
                ";", "set-option", "-t", session, "status-right-length", "100",
                ";", "set-option", "-t", session, "status-right", label_text("orch " + fleet["name"])).split()[0]


def wait_ready(fleet, ns, timeout):
    """Until workers `ns` are past booting and dialogs, answering the dialogs a
    profile marks safe (trusting the workdir the lead chose), each again only
    while it still shows 2 s on (a CLI can drop a key it gets as it draws), at most
    ANSWER_TRIES times;
    returns the Rows of those still not ready."""
    deadline, answered, since = time.time() + timeout, {}, {}
    entries = {w["n"]: AGENTS[w["profile"]] for w in fleet["workers"]}
    while True:
        began = time.time()             # what a poll shows, it shows from when the poll began
        rows, now = [r for r in poll(fleet) if r.n in ns], time.time()
        for r in rows:                  # ready means settled: CLIs open dialogs a moment after idle
            since[r.n] = (since.get(r.n) or began) if r.shows in PAST_BOOT else None
        waiting = [r for r in rows if since[r.n] is None or now < since[r.n] + entries[r.n].get("settle", SETTLE)]
        walled = [r for r in waiting if login_wall(fleet, r)]         # no wait gets past a login
        for r in waiting:
            for pattern, keys in entries[r.n].get("answer", []):
                tries, last = answered.get((r.n, pattern), (0, 0.0))
                if r.shows == "dialog" and tries < ANSWER_TRIES and now >= last + 2 and re.search(pattern, r.screen):
                    tmux("send-keys", "-t", r.pane, *keys)
                    answered[r.n, pattern] = tries + 1, now
                    log_event(fleet, "answer", worker=r.n, dialog=pattern, keys=" ".join(keys))
        # A screen that turned ready before the deadline holds it for its settle first: a dialog
        # then still counts; one that turns ready only after the deadline is not ready.
        settling = [r for r in waiting if since[r.n] is not None and since[r.n] <= deadline]
        if not settling and (now >= deadline or all(r.shows == "exited" or r in walled for r in waiting)):
            return waiting                  # all(): none left
        time.sleep(0.25)


def add_workers(fleet, count, agent, timeout):
    """Open `count` worker panes, K per tiled window, and wait up to `timeout`
    seconds (0: not at all) until they are ready; returns the Rows of those not."""
    import uuid
    profile = checked_profile(agent)
    k = fleet["per_window"]
    AGENTS[profile].get("seed", lambda fleet, agent: None)(fleet, agent)
    for _ in range(count):
        n = len(fleet["workers"]) + 1
        w = {"n": n, "agent": agent, "profile": profile, "pane": None}
        if profile == "claude":
            w["session_id"] = str(uuid.uuid4())
        for folder in (worker_dir(fleet, n), state_dir(fleet, n)):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        if fleet.get("git"):
            add_worktree(fleet, n)
        fleet["workers"].append(w)
        save_fleet(fleet)                 # the worker command reads its record
        w["pane"] = open_pane(fleet, n, fleet["workers"][(n - 1) // k * k]["pane"])
        save_fleet(fleet)
        log_event(fleet, "pane", worker=n, pane=w["pane"], agent=agent)
    new = set(range(len(fleet["workers"]) - count + 1, len(fleet["workers"]) + 1))
    return wait_ready(fleet, new, timeout) if timeout else []


def isolation_line(fleet):
    """What spawn and status say of the fleet's sandbox."""
    if fleet.get("isolate"):
        return "%s: workers are isolated (%s): each writes only its own folder %s%s" % (
            fleet["name"], fleet.get("isolation"), os.path.join(shared_dir(fleet), "w<n>"),
            " and its worktree %s (with what git needs to commit there)" % worktree_of(fleet, "<n>")
            if fleet.get("git") else "")
    return "%s: workers are NOT isolated (%s): each can write every file of the fleet; orch's own record " \
           "still keeps what it read" % (fleet["name"], fleet.get("isolation") or "an older fleet")


def require_ready(fleet, waiting, timeout):
    """The line spawn and add say; workers still not ready (`waiting`) raise, after it."""
    line = "%s: %d worker(s) in tmux session %s; shared workspace %s" % (
        fleet["name"], len(fleet["workers"]), fleet["session"], shared_dir(fleet))
    if waiting:
        walled = [r for r in waiting if login_wall(fleet, r)]
        raise OrchError("not ready %s: %s: look with `orch read %s all`" % (
            "at once" if len(walled) == len(waiting) else "after %gs" % timeout,
            ", ".join("W%d %s" % (r.n, login_wall(fleet, r) or r.shows) for r in waiting), fleet["name"]),
            said=[line])
    return line


def fleet_summaries():
    """A Summary per fleet in ORCH_HOME, a broken one included with its error."""
    live, fleets = live_sessions(), []
    for name in fleet_names():
        try:
            f = load_fleet(name)
        except OrchError as e:
            fleets.append(Summary(name, False, None, None, None, None, str(e)))
            continue
        fleets.append(Summary(name, f["session"] in live, len(f["workers"]),
                              sum(is_done(f, w["n"]) for w in f["workers"]), f["agent"], f["workdir"], None))
    return fleets


def save_logs(fleet, why):
    """Append each pane's whole scrollback to logs/w<n>.log; return what was saved."""
    try:
        captures = capture_panes(fleet, fleet["workers"], history=True, ansi=False)
    except OrchError:
        return []                       # the session is gone: nothing left to save
    for n, capture in captures.items():
        fd = open_append(os.path.join(fleet["run"], "logs", "w%d.log" % n))
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write("=== %s %s pane %s ===\n%s\n" % (now_iso(), why, capture.pane, capture.screen.rstrip("\n")))
    return sorted(captures)


def fleet_processes(fleet, n=None):
    """PIDs of the processes started for this fleet (for worker n only, if
    given), by the variables `orch worker` gives every agent, which its
    children and daemons inherit. Linux (/proc) only; elsewhere none."""
    want = {b"ORCH_FLEET=" + fleet["name"].encode(), os.fsencode("ORCH_HOME=" + orch_home())}
    want |= {b"ORCH_WORKER=%d" % n} if n else set()
    pids = []
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():           # /proc/self, /proc/sys...
            continue
        try:
            with open("/proc/%s/environ" % pid, "rb") as f:
                env = set(f.read().split(b"\0"))
        except OSError:
            continue
        if want <= env and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def end_processes(fleet, n=None):
    """End what is left of the fleet's (or worker n's) processes: detached
    daemons and children that ignore the hangup; SIGTERM, then SIGKILL."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids, deadline = fleet_processes(fleet, n), time.time() + 1.0
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        while pids and time.time() < deadline:
            time.sleep(0.05)
            pids = fleet_processes(fleet, n)
        if not pids:
            return


def end_fleet(name, unrecorded_ok=False):
    """End fleet `name`'s tmux session and what is left of its processes,
    saving each pane's scrollback first when its fleet.json can be read;
    returns what was done. A session of another ORCH_HOME is never ended, nor,
    unless `unrecorded_ok`, one with a damaged fleet.json that names no ORCH_HOME."""
    session, home = session_of(name), session_home(session_of(name))
    if home and home != orch_home():
        raise OrchError("tmux session %s belongs to the fleet of ORCH_HOME %s, not this one: "
                        "run orch with that ORCH_HOME" % (session, home))
    try:
        fleet = load_fleet(name)
    except OrchError:               # a damaged fleet.json must not keep its agents running
        if session not in live_sessions() or home not in (orch_home(), "" if unrecorded_ok else None):
            raise
        tmux("kill-session", "-t", "=" + session)
        end_processes({"name": name})
        return "%s: killed %s; its fleet.json is damaged, so no scrollback was saved" % (name, session)
    try:                                # a full or read-only ORCH_HOME must not keep agents running
        saved, lost = save_logs(fleet, "kill"), ""
    except OSError as e:
        saved, lost = [], "; could not save the scrollback: %s" % e.strerror
    except OrchError as e:              # a FIFO planted at a log
        saved, lost = [], "; could not save the scrollback: %s" % e
    try:
        tmux("kill-session", "-t", "=" + session)
        gone = False
    except OrchError as e:
        if e.kind not in ("server", "target"):
            raise
        gone = True
    end_processes(fleet)
    with contextlib.suppress(OSError):
        log_event(fleet, "kill", saved=saved, already_gone=gone)
    logs = os.path.join(fleet["run"], "logs")
    if gone:
        return "%s: tmux session %s was already gone; saved %d pane log(s) in %s%s" % (
            name, session, len(saved), logs, lost)
    return "%s: killed %s; scrollback of W%s in %s%s" % (name, session, ",W".join(map(str, saved)) or "-", logs, lost)


# --- briefs and grammar --------------------------------------------------------

ROLES = {
    "finder": "Determine whether the following holds, and report every instance you can "
              "prove from the files: {goal}. Report only what you opened and read yourself; "
              "an empty result is a valid result.",
    "verifier": "Determine whether each claim below is true: {goal}. Assume every claim is "
                "wrong until primary evidence proves it. Re-derive each one yourself from the "
                "files first, then compare with the claim.",
    "fixer": "Determine whether this change is needed, and if it is, make the smallest change "
             "that does it: {goal}. Report each change with path:line.",
    "scribe": "Summarise, from the bus and the result files only: {goal}. Quote, do not "
              "embellish; mark anything you could not check as unchecked.",
}

FINDINGS_FORMAT = """Write one finding per line, exactly in this format (no table, no bullets):
    F<k> | <path>:<line>[-<end>] | <one-line claim> | <exact text quoted from those lines>
- <path> is relative to the workdir; <line> and <end> are 1-based line numbers.
- The quote is copied from the file, never paraphrased: a finding whose quote is not on
  the cited lines is thrown out by a mechanical check before anyone reads it.
- Use `-` as the location for a finding that is not about one place; leave out the quote then.
- The quote is the rest of the line and may contain `|`; write a `|` inside the claim as `\\|`.
- Example:  F1 | src/app.py:42 | TODO marker: input is not validated | # TODO: validate input
- Found nothing? Write one plain sentence saying what you checked."""

VERDICT_FORMAT = """Write one verdict per finding, exactly in this format:
    W<n>.F<k> | CONFIRMED|REFUTED|UNVERIFIABLE | <path>:<line> | <why, one line> | <exact text of that line>
- <path>:<line> is the place you read to decide; the last field is copied from that line, never
  paraphrased: orch checks it against the file. A verdict without a location and quote, or
  whose quote is not there, counts as no verdict, and a verifier caught inventing a quote is
  not asked again and none of its verdicts count.
- CONFIRMED only if the cited lines say what the claim says; REFUTED if they do not;
  UNVERIFIABLE if you cannot settle it. Never confirm what you did not read yourself.
- The quote is the rest of the line and may contain `|`; write a `|` inside the why as `\\|`.
- Example:  W2.F1 | CONFIRMED | src/app.py:42 | the TODO is there | # TODO: validate input"""
CHANGE_FORMAT = """A line `W<n>.C | commit <id> | diff <path> | worktree <path> | <summary>` is a change
another worker made: a commit of orch's, its diff, and a checkout of exactly that commit made
for you (read it, run things in it). Judge whether the change does what its author was asked,
and breaks nothing, with the same verdict format:
    W<n>.C | CONFIRMED|REFUTED|UNVERIFIABLE | <path>:<line> | <why, one line> | <exact text of that line>
- <path> is relative to that checkout, and the line is read there: in the change as committed.
- Example:  W3.C | REFUTED | shop/cart.py:7 | total() now drops the last item | return sum(items[:-1])"""
FIXER_FORMAT = """Write in the result file, first, one line that sums up your change; then what you
changed (path:line) and how you checked it: the commands you ran and what they printed.
orch reads your change from your worktree with git itself, not from this file."""
LEADING_PATTERN = r"(?i)\b(fix|find|confirm) (the|this) (bug|bugs|issue|problem|vulnerabilit)"


def make_brief(fleet, n, role, goal, constraints, result, done, title=None, findings=(), workdir=None, scope=()):
    import shlex
    count = len(fleet["workers"])
    first = "Work only inside the workdir; do not change any file there (your role is read-only)."
    if role == "fixer":
        first = "Work only inside the workdir; change only what the goal needs."
        if fleet.get("git"):
            first = ("Work only inside the workdir, a git worktree of your own on the branch `%s`. Make the "
                     "smallest change that does the goal, and commit it there (git add, git commit) with a message "
                     "that says why. Never push, reset, clean or switch branches." % branch_of(fleet, n))
    rules = [first] + ["Change only files under %s (relative to the workdir): a change to any other file is "
                       "OUT-OF-SCOPE and is never merged; a finding elsewhere is flagged."
                       % ", ".join("`%s`" % x for x in scope)] * bool(scope) + [
        "Write only in your own folder `%s`: every other file of the fleet is read-only to you."
        % worker_dir(fleet, n)] + list(constraints)
    parts = [
        "# Worker %d of %d — %s (%s)" % (n, count, title or goal.split("\n")[0][:60].rstrip(),
                                         role.upper()), "",
        "You are worker %d of %d in fleet `%s`. A different worker will check your result."
        % (n, count, fleet["name"]), "",
        "- Workdir: `%s`" % (workdir or workdir_of(fleet, n)),
        "- Result file: `%s`" % result,
        "- Done flag: `%s`" % done,
        "- Bus: `%s`" % bus_path(fleet),
        "- Outbox: `%s`" % worker_file(fleet, n, "bus.md"), "",
        "## Goal", ROLES[role].format(goal=goal.strip().rstrip(".")), "",
        "## Hard constraints"] + ["- " + r for r in rules] + [""]
    if findings:
        parts += ["## Findings to check"] + ["    " + f for f in findings] + [""]
    parts += ["## Deliverable", "Write your result to the result file `%s`." % result]
    if role == "finder":
        parts += [FINDINGS_FORMAT]
    elif role == "verifier":
        parts += [VERDICT_FORMAT] + [CHANGE_FORMAT] * any(re.match(r"W\d+\.C ", f) for f in findings)
    elif role == "fixer":
        parts += [FIXER_FORMAT]
    parts += ["", "## Done signal",
              "When the result file is complete, and only then, touch the done flag as your "
              "last action:", "    touch %s" % shlex.quote(done), "",
              "## Coordination",
              "The bus is a plain file orch keeps: every worker's posts and the lead's. Read it "
              "between steps. To post, append one line to your outbox; orch adds it to the bus as [W%d]:" % n,
              "    echo '<one line>' >> %s" % shlex.quote(worker_file(fleet, n, "bus.md")),
              "Write @lead in a line only when you cannot go on without the lead's answer; "
              "the lead answers on the bus with a line that starts with [lead].", "",
              "## Autonomy",
              "Work autonomously to the end. Never wait for confirmation: decide, note the "
              "assumption in your result, and go on.", ""]
    return "\n".join(parts)


def brief_message(path, key=None):
    """The line that sends a worker to its brief; a verifier's also carries
    its round key, which exists only in its pane and in orch's memory."""
    return "Read and follow the brief in `%s` - work autonomously, do not wait for confirmation.%s" % (
        path, " Write this line first in your result file, exactly: orch-key: %s" % key if key else "")


LOC_PATTERN = r"(.+):(\d{1,9})(?:-(\d{1,9}))?$"     # path:line[-end]; no 5,000-digit lines


def clean_field(s):
    return s.strip().strip("`").strip()


def unquote(quote):
    if len(quote) > 1 and quote[0] == quote[-1] and quote[0] in "\"'":
        return quote[1:-1]
    return quote


def cells(text):
    """The cells of a grammar line: split on '|', where '\\|' (a pipe escaped
    for a markdown table) is text."""
    return [c.replace("\0", "|") for c in text.replace("\\|", "\0").split("|")]


def split_at(rest, i):
    """The cells `rest` read as a head (a claim, or a verdict's why: its first
    i cells) and a quote (the others), each cleaned."""
    return clean_field("|".join(rest[:i])), unquote(clean_field("|".join(rest[i:])))


def cite(record, loc_cell, rest):
    """Fill a Finding's or a Verdict's place from its location cell and the
    cells after it, read as a head and a quote (the first split, see splits())."""
    loc = re.match(LOC_PATTERN, clean_field(loc_cell))
    record.path, record.line = (loc.group(1), int(loc.group(2))) if loc else (None, None)
    record.end = int(loc.group(3) or loc.group(2)) if loc else None
    head, record.quote = split_at(rest, 1 if len(rest) > 1 else record.FIRST)
    setattr(record, record.HEAD, head)
    record.rest = rest
    return loc


def splits(record):
    """Every other reading of a record's cells as head and quote, in order:
    a claim (or why) may hold a '|' as well as a quote, and code is full of them."""
    return (split_at(record.rest, i) for i in range(record.FIRST, min(len(record.rest), record.FIRST + SPLITS_CAP)))


def grammar_lines(text):
    """Lines with markdown stripped: bullets, quotes, bold, table pipes, fences."""
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("```"):
            continue
        line = re.sub(r"^(?:[-*+>]\s+|\d+[.)]\s+)+", "", line).replace("**", "").strip()
        if line.startswith("|") and line.endswith("|"):
            line = line[1:-1].strip()            # a markdown table row
        yield i, clean_field(line)


def parse_findings(text, source, cap=None):
    """F<k> | <path>:<line>[-<end>] | <claim> | <quote>  (also W<n>.F<k> ids).
    Returns ([Finding], problems); a line that starts like a finding but breaks
    the grammar is a problem naming its file and line, never dropped silently.
    With `cap`, it stops at cap + 1 findings or problems: bounded work on a result of any size."""
    found, problems = [], []
    for i, line in grammar_lines(text):
        if cap is not None and (len(found) > cap or len(problems) > cap):
            problems.append("%s: read as far as line %d; what follows is not collected" % (source, i))
            break
        m = re.match(r"(?:W(\d{1,9})\.)?F(\d{1,9})\s*\|(.*)$", line)
        if not m:
            # Real workers like tables: a row that cites path:line without an id
            # is a finding the grammar cannot take, so say so.
            if line.count("|") >= 2 and re.search(r"[^\s|`]:\d", line):     # fixed width: linear
                problems.append("%s:%d: cites a location but has no F<k> id (want `F<k> | "
                                "path:line | claim | quote`): %s" % (source, i, line[:80]))
            continue
        parts = cells(m.group(3))
        f = Finding(worker=int(m.group(1)) if m.group(1) else None, k=int(m.group(2)))
        loc = cite(f, parts[0], parts[1:])
        if len(parts) < 2 or not f.claim or not (clean_field(parts[0]) == "-" or loc) \
                or (loc and f.end < f.line):
            problems.append("%s:%d: not a finding (want `F<k> | path:line | claim | quote`): %s"
                            % (source, i, line[:80]))
            continue
        found.append(f)
    return found, problems


def parse_verdicts(text, source):
    """W<n>.F<k> | CONFIRMED|REFUTED|UNVERIFIABLE | <path>:<line> | <why> | <quote>
    -> ({id: Verdict}, problems). The why may be left out; a verdict in the old
    grammar (free evidence, no location and quote) is kept with empty ones and
    reported, never dropped; a second verdict for one finding is reported and
    the first one stands."""
    verdicts, problems = {}, []
    for i, line in grammar_lines(text):
        m = re.match(r"(W\d{1,9}\.(?:F\d{1,9}|C))\s*\|(.*)$", line)
        if not m:
            continue
        parts = cells(m.group(2))
        word = clean_field(parts[0]).upper()
        if word not in ("CONFIRMED", "REFUTED", "UNVERIFIABLE"):
            problems.append("%s:%d: not a verdict (want `W<n>.F<k> | CONFIRMED|REFUTED|"
                            "UNVERIFIABLE | path:line | why | quote`): %s" % (source, i, line[:80]))
            continue
        if m.group(1) in verdicts:
            problems.append("%s:%d: a second verdict for %s: the first one stands" % (source, i, m.group(1)))
            continue
        evidence = [clean_field(c) for c in parts[1:3]] + [clean_field("|".join(parts[3:]))] * (len(parts) > 3)
        v = Verdict(verdict=word, why="", quote="", rest=[], at="%s:%d" % (source, i), evidence=" | ".join(evidence))
        if not (len(parts) > 2 and cite(v, parts[1], parts[2:])):
            v.path = v.line = v.end = None
            v.why, v.quote, v.rest = "", "", []
            if word != "UNVERIFIABLE":
                problems.append("%s:%d: %s gives no `path:line | why | quote` evidence: it counts as "
                                "no verdict" % (source, i, m.group(1)))
        verdicts[m.group(1)] = v
    return verdicts, problems


def place(f):
    """A finding's location as its finder wrote it: path:line[-end], or '-'."""
    if f.path is None:
        return "-"
    return "%s:%d%s" % (f.path, f.line, "" if f.end == f.line else "-%d" % f.end)


def finding_line(f, tree=None):
    """A finding as a verifier's brief lists it; a change with the checkout made for that verifier."""
    if f.change:
        return " | ".join((f.id, "commit " + f.change["commit"], "diff " + f.change["diff"], "worktree %s" % tree,
                           f.claim))
    return " | ".join(x for x in (f.id, place(f), f.claim, f.quote) if x)


# --- verification --------------------------------------------------------------

FINALS = ("CONFIRMED", "REFUTED", "DISPUTED", "BAD-CITATION", "UNVERIFIABLE")
CHANGE_FINALS = ("CONFIRMED", "REFUTED", "DISPUTED", "BREAKS-CHECK", "OUT-OF-SCOPE", "UNVERIFIABLE")


def file_lines(workdir, rel, cache):
    """The lines of a file a finding or verdict cites, read once per verify
    (`cache`), as a worker may have planted it: inside the workdir, a regular
    file, at most READ_CAP bytes. Returns a list, or what is wrong. Once
    `cache` is frozen (cache[None]: the findings are collected) it is the
    workdir as verification sees it: no file is read any more. A workdir
    (repository, commit) is that commit's tree, which no worker can change."""
    if isinstance(workdir, tuple):
        return commit_lines(workdir, rel, cache)
    root = os.path.realpath(workdir)
    path = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, path]) != root:
        return "path escapes the workdir"
    if path not in cache and cache.get(None):
        return "not in orch's copy of the workdir (the files the findings cite)"
    if path not in cache:
        text, why = read_untrusted(path)
        cache[path] = (why or "no such file") if text is None else text.splitlines()
    return cache[path]


def commit_lines(at, rel, cache):
    """The lines of path `rel` in commit at[1] of repository at[0] (a symlink:
    its target), or what is wrong."""
    repo, commit = at
    rel = os.path.normpath(rel)
    if os.path.isabs(rel) or rel == ".." or rel.startswith("../"):
        return "path escapes the change's tree"
    if (commit, rel) not in cache:
        kind = git(repo, "cat-file", "-t", "%s:%s" % (commit, rel), codes=(0, 128)).strip()
        size = git(repo, "cat-file", "-s", "%s:%s" % (commit, rel)).strip() if kind == "blob" else "0"
        cache[commit, rel] = "not a file in the change" if kind != "blob" else "bigger than %d bytes" % READ_CAP \
            if int(size) > READ_CAP else git(repo, "cat-file", "blob", "%s:%s" % (commit, rel)).splitlines()
    return cache[commit, rel]


def check_quote(workdir, cited, quote, cache, least=0):
    """The mechanical check of a place and a quote (a finding's citation, a
    verdict's evidence; `cited` gives path, line and end): 'ok' or what is
    wrong. The quote, whitespace-normalised, must lie within two lines of the
    cited range, and be `least` characters long or a whole line (evidence: one
    letter is in any file)."""
    lines = file_lines(workdir, cited.path, cache)
    if isinstance(lines, str):
        return lines
    if cited.line < 1:
        return "line %d does not exist: lines count from 1" % cited.line
    if cited.end > len(lines):
        return "line %d is past the end (%d lines)" % (cited.end, len(lines))
    window = lines[max(0, cited.line - 3):cited.end + 2]        # two lines either side
    if quote and norm(quote) not in norm(" ".join(window)):
        return "quote not within 2 lines of line %d" % cited.line
    if len(norm(quote)) < least and norm(quote) not in [norm(x) for x in window]:
        return "quote too short to check: give the whole line"
    return "ok"


def check_cited(workdir, cited, cache, least=0):
    """check_quote of a Finding or Verdict; when it fails, the other splits of
    its cells are tried in order, and the first whose quote is in the file is
    kept as its head and quote."""
    why = check_quote(workdir, cited, cited.quote, cache, least)
    for head, quote in splits(cited) if why != "ok" else ():
        if check_quote(workdir, cited, quote, cache, least) == "ok":
            setattr(cited, cited.HEAD, head)
            cited.quote, why = quote, "ok"
            break
    return why


def check_citation(workdir, f, cache=None):
    """A finding's location: 'ok', 'n/a' (not about one place), or what is wrong."""
    if f.path is None:
        return "n/a"
    return check_cited(workdir, f, {} if cache is None else cache)


def check_evidence(workdir, v, cache, f):
    """A verdict's evidence on finding f: 'checked', 'unsupported' (no
    location and quote, a CONFIRMED read elsewhere than f's cited lines, or a
    file orch did not keep), 'missing' (no verdict), or 'fabricated: <what is wrong>'."""
    if v.verdict == "MISSING" or v.path is None or not v.quote:
        return "missing" if v.verdict == "MISSING" else "unsupported"
    if v.verdict == "CONFIRMED" and f.change and os.path.normpath(v.path) not in f.change["paths"]:
        return "unsupported: a CONFIRMED verdict on a change must cite a file the change touches"
    if v.verdict == "CONFIRMED" and f.path is not None and not (
            os.path.normpath(v.path) == os.path.normpath(f.path) and f.line - 2 <= v.line <= v.end <= f.end + 2):
        return "unsupported: a CONFIRMED verdict's evidence must lie at the finding's cited lines"
    why = check_cited(workdir, v, cache, least=8)
    if why.startswith(("not in orch's copy", "bigger than")):      # not the verifier's lie
        return "unsupported: " + why
    return "checked" if why == "ok" else ("unsupported: " if "too short" in why else "fabricated: ") + why


def next_verifier(f, pool, count, dropped, profiles):
    """The verifier to ask next about finding f: never one of its finders, one
    asked about it before or one dropped; of the others, one of another agent
    family than its finders' first, then of a family that has not yet given a
    verdict on it (so a tie goes to another family where one is left), then
    the first after its finder in cyclic order; or None."""
    finders = f.finders or [f.worker]
    asked = {v.verifier for v in f.rounds} | set(finders) | set(dropped)
    theirs, voted = {profiles[n] for n in finders}, {profiles[v.verifier] for v in f.rounds}
    order = sorted((v for v in pool if v not in asked),
                   key=lambda v: (profiles[v] in theirs, profiles[v] in voted, (v - f.worker) % count))
    return (order or [None])[0]


def collect_findings(fleet):
    """The Findings of every worker with a done flag (one that another worker
    reported too, at the same place with the same quote and claim, merged into
    the first), and the problems met."""
    findings, problems, places = [], [], {}
    for w in fleet["workers"]:
        n = w["n"]
        if not is_done(fleet, n):
            continue
        path, brief = worker_file(fleet, n, "result.md"), worker_file(fleet, n, "task.md")
        text, why, changed = result_of(fleet, n)
        kept_brief = read_text(kept_path(fleet, "agent-%d.task.md" % n))
        if kept_brief is not None and read_untrusted(brief)[0] != kept_brief:
            problems.append("W%d's brief %s is not what orch wrote: W%d may have answered another brief"
                            % (n, brief, n))
        problems += [p for p in ("%s: %s" % (path, why) if why else None, changed) if p]
        if text is None:
            problems.append("W%d touched its done flag but wrote no usable %s" % (n, path))
            continue
        found, bad = parse_findings(text, path, FINDINGS_CAP)
        problems += bad
        if len(found) > FINDINGS_CAP:
            total = len(re.findall(r"(?m)^[\s*>|+-]*(?:\d+[.)]\s+)?(?:\*\*)?(?:W\d{1,9}\.)?F\d{1,9}\s*\|", text))
            problems.append("W%d reported %d findings: the first %d are verified, the other %d are not collected"
                            % (n, total, FINDINGS_CAP, total - FINDINGS_CAP))
            found = found[:FINDINGS_CAP]
        ks = set()
        for f in found:
            if f.k in ks:
                problems.append("%s: F%d appears twice; the first one counts" % (path, f.k))
                continue
            ks.add(f.k)
            f.worker, f.rounds, f.finders, f.also = n, [], [n], []
            key = (os.path.normpath(f.path), f.line, f.end, norm(f.quote), norm(f.claim)) if f.path and f.quote else None
            same = places.get(key)
            if same and n not in same.finders:    # found by another too: one finding, verified once, each credited
                same.finders.append(n)
                same.also.append(f.id)
                continue
            places.setdefault(key, f)
            findings.append(f)
    return findings, problems


def collect_changes(fleet, check, timeout, problems):
    """The change of each done worker of a write fleet as a Finding W<n>.C,
    snapshotted before any verifier is briefed. A change that leaves its
    scopes or adds a link out of the tree is OUT-OF-SCOPE; with `check` (the
    lead's command, argv), one on which it fails where base passed is BREAKS-CHECK."""
    if not fleet.get("git"):
        return []
    tree = detached(fleet, "check", fleet["git"]["base"]) if check else None     # one, made clean for each run
    try:
        return changes_checked(fleet, check, timeout, problems, tree)
    finally:
        if tree:
            drop_tree(fleet, tree)


def changes_checked(fleet, check, timeout, problems, tree):
    """collect_changes() with the check run in orch's checkout `tree`."""
    import shlex
    changes, base = [], None
    for w in fleet["workers"]:
        n = w["n"]
        if not is_done(fleet, n):
            if getattr(worker_change(fleet, n), "files", 0):
                problems.append("W%d is not done: its change is not verified (verify again once it is)" % n)
            continue
        said = [x.strip() for x in (result_of(fleet, n)[0] or "").splitlines()]
        summary = defang(one_line(next((x for x in said if x and not x.startswith(("#", "orch-key"))),
                                       "(its result file sums up nothing)"), 200))
        try:
            snap = snapshot_change(fleet, w, summary)
        except OrchError as e:          # a worktree removed by hand, a repository git cannot read
            problems.append("W%d's change cannot be read: %s" % (n, e))
            continue
        if not snap:
            continue
        commit, c = snap
        f = Finding(worker=n, k=0, claim=summary, quote="", rest=[], rounds=[], finders=[n],
                    also=[], change=dict(c._asdict(), commit=commit, scope=scope_of(fleet, w, rel=True), check=None,
                                         diff=os.path.join(shared_dir(fleet), "changes", "w%d.diff" % n)))
        f.citation = "OUT-OF-SCOPE" if c.outside or c.escapes else "n/a"
        if check:
            if base is None:
                base = checked_in(fleet, tree, fleet["git"]["base"], check, timeout)
                if base["exit"] != 0:
                    problems.append("`%s` %s on base itself: no change can be told to break it; fix the command "
                                    "(or base) and verify again" % (shlex.join(check), base["outcome"]))
            got = checked_in(fleet, tree, commit, check, timeout)
            f.change["check"] = {"command": shlex.join(check), "base": base, "change": got}
            if base["exit"] == 0 and got["exit"] != 0 and f.citation == "n/a":
                f.citation = "BREAKS-CHECK"
        changes.append(f)
        log_event(fleet, "snapshot", worker=n, commit=commit, change=change_line(c), verdict=f.citation)
    return changes


def checked_in(fleet, tree, commit, argv, timeout):
    """The lead's check on `commit`, in orch's checkout `tree` made clean at
    it first (through git's record of the tree: the last check ran code there)."""
    here = in_tree(fleet, tree)
    git(tree, "checkout", "-q", "-f", "--detach", commit, **here)
    git(tree, "clean", "-q", "-ffdx", **here)
    code, tail = run_check(fleet, tree, argv, timeout)
    return {"exit": code, "outcome": check_word(code), "tail": tail}


def is_counted(v, dropped):
    """A verdict is a vote: decisive, with checked evidence, by a verifier not dropped."""
    return v.verdict in ("CONFIRMED", "REFUTED") and v.check == "checked" and v.verifier not in dropped


def majority(f, dropped):
    """The votes on finding f: (how many say CONFIRMED, how many REFUTED, the
    side with a strict majority, or DISPUTED on a tie, UNVERIFIABLE with none)."""
    said = [v.verdict for v in f.rounds if is_counted(v, dropped)]
    yes, no = said.count("CONFIRMED"), said.count("REFUTED")
    return yes, no, "CONFIRMED" if yes > no else "REFUTED" if no > yes else "DISPUTED" if yes else "UNVERIFIABLE"


def final_verdict(f, dropped):
    """Once nobody is left to ask: BAD-CITATION (a change: OUT-OF-SCOPE or
    BREAKS-CHECK), else the majority's word."""
    if f.citation not in ("ok", "n/a"):
        return f.citation if f.change else "BAD-CITATION"
    return majority(f, dropped)[2]


def adjudication(f, dropped):
    """For a brief: both sides' evidence of a finding whose verdicts disagree."""
    sides = [v for v in f.rounds if is_counted(v, dropped)]
    if len({v.verdict for v in sides}) < 2:
        return []
    return ["      disputed: W%d says %s, reading %s:%d %s (%s)" % (
        v.verifier, v.verdict, v.path, v.line, json.dumps(v.quote, ensure_ascii=False),
        v.why or "no reason given") for v in sides] + [
        "      decide which side the file supports, from the lines themselves"]


def round_file_forged(fleet, v, stem, key, text, flag, before, after, foreign):
    """Why verifier v's round file (`text`, None: unreadable) is not its own
    work, or "" if nothing says so (None: there is none): its done flag
    (`flag`) must exist, its first line must be its round key, its screen must
    have moved (digests `before` and `after` its brief) and no other worker's
    agent may have written it."""
    if not os.path.exists(flag):
        return "no done flag: W%d did not finish it" % v
    if text is None:
        return None
    if not re.match(r"\s*orch-key: %s\s*$" % key, text.split("\n", 1)[0]):
        return "its first line is not W%d's round key: not written by W%d" % (v, v)
    if after == before:
        return "W%d's screen never moved after its brief was sent: it did not write them" % v
    writer = foreign.get(os.path.realpath(stem + ".result.md")) or foreign.get(os.path.realpath(flag))
    return "W%d wrote it (its agent's hooks say so), not W%d" % (writer, v) if writer else ""


def run_round(fleet, k, jobs, timeout, emit, problems, extra, budget, tree, trees):
    """One verification round: a brief per verifier ({v: [Finding]}, with
    `extra` lines under a finding, and each change with the checkout made for
    its verifier, trees[v, id]), sent, waited for; returns its
    RoundOutcome. A verifier that cannot be reached, dies or runs out of time
    costs only its own verdicts."""
    vdir, began = os.path.join(shared_dir(fleet), "verify"), time.time()
    briefs = {v: os.path.join(vdir, "r%d-w%d.task.md" % (k, v)) for v in jobs}
    stems = {v: worker_file(fleet, v, "r%d" % k) for v in jobs}        # r<k>.result.md, r<k>.done
    written, at = {}, os.open(vdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)   # briefs go there, whatever
    try:                                # becomes of its path
        for v, fs in sorted(jobs.items()):
            goal = ("the %d finding(s) listed under 'Findings to check', made by other workers, "
                    "are true; give one verdict per finding" % len(fs))
            if any(f.change for f in fs):
                goal = ("the %d finding(s) and change(s) listed under 'Findings to check', made by other workers, "
                        "hold; give one verdict per line" % len(fs))
            written[v] = defang(make_brief(       # it quotes workers; the lead may read it
                fleet, v, "verifier", goal, ["Do not read other verifiers' result files.",
                                             "The workdir above is orch's copy of the files the findings cite, as "
                                             "they were when orch collected the findings: judge those. The whole "
                                             "workdir, for context only, is `%s`." % fleet["workdir"]],
                stems[v] + ".result.md", stems[v] + ".done", "verification round %d" % k,
                [line for f in fs for line in [finding_line(f, trees.get((v, f.id)))] + extra.get(f.id, [])],
                workdir=tree))
            write_file(os.path.basename(briefs[v]), written[v], at)
            log_event(fleet, "verify-brief", round=k, worker=v, findings=len(fs))
    finally:
        os.close(at)
    keys = {v: os.urandom(8).hex() for v in jobs}
    before = {r.n: r.digest for r in poll(fleet)}     # a verifier that works changes its screen
    failed = deliver(fleet, {v: brief_message(briefs[v], keys[v]) for v in jobs})
    incomplete = ["round %d: %s" % (k, why) for why in failed.values()]
    waiting = {v: stems[v] + ".done" for v in jobs if v not in failed}     # unreached: MISSING
    deadline = time.time() + timeout
    while waiting:
        code = wait_loop(fleet, waiting, max(0.1, deadline - time.time()), 0.25, STALL,
                         lambda v: default_nudge(fleet, v, briefs[v], k), emit, budget)
        if code != 4:
            if code == 3:
                incomplete.append("round %d: W%s timed out after %gs" % (
                    k, ",W".join(str(v) for v in sorted(waiting) if not os.path.exists(waiting[v])), timeout))
            break
        for r in poll(fleet, flags=waiting):      # a verifier died: the rest go on
            if r.n in waiting and r.state == "exited":
                incomplete.append("round %d: W%d exited without its verdicts" % (k, r.n))
                del waiting[r.n]
    after = {}
    with contextlib.suppress(OrchError):
        after = {r.n: r.digest for r in poll(fleet)}
    foreign = {os.path.realpath(f): w for w, fs in foreign_writes(fleet, began).items() for _, f in fs}
    verdicts, digests = {v: {} for v in jobs}, {}
    for v in [v for v in jobs if v in waiting or os.path.exists(stems[v] + ".done")]:   # reached
        path, flag = stems[v] + ".result.md", stems[v] + ".done"
        text, why = read_untrusted(path)
        keep(fleet, "r%d-w%d.result.md" % (k, v), text or "")
        if read_untrusted(briefs[v])[0] != written[v]:
            problems.append("%s is not what orch wrote: W%d may have judged other findings" % (briefs[v], v))
        verdicts[v], bad = parse_verdicts(text or "", path)
        problems += bad + (["%s: %s" % (path, why)] if why else [])
        forged = round_file_forged(fleet, v, stems[v], keys[v], text, flag, before[v], after.get(v), foreign)
        if forged:
            problems.append("%s: %s; its verdicts do not count" % (path, forged))
            for verdict in verdicts[v].values():
                verdict.forged = forged
        digests[v] = file_digest(path), file_digest(flag)
    problems += incomplete
    return RoundOutcome(verdicts, incomplete, digests)


def plant_canary(fleet, findings, v, briefed, taken, cache, rng):
    """A canary for verifier v's brief: a finding orch knows to be false, built
    so that it passes the citation check. It borrows the claim of a real
    finding of another worker than v (one not in v's brief where there is one),
    whose claim is about its own line (it shares a word with its quote, and
    names no line or file), and puts it on another line of a cited file that
    shares none of the claim's or the quote's words and is not near any
    finding's lines, quoting that line; its id is one that finder has not used
    (added to `taken`). None when no finding or line will do."""
    words = lambda text: set(re.findall(r"[a-z0-9_]{2,}", text.lower()))
    real = [f for f in findings if f.path is not None and f.citation == "ok" and v not in f.finders
            and words(f.claim) & words(f.quote) and not re.search(r"\bline \d|\w\.\w{1,4}\b", f.claim)]
    near = {(os.path.normpath(f.path), i) for f in findings if f.path for i in range(f.line - 2, f.end + 3)}
    paths, said = sorted({g.path for g in real}), {}    # bounded work: at most 8 claims on 8 files
    for f in sorted(rng.sample(real, len(real)), key=lambda f: f in briefed)[:8]:
        for path in rng.sample(paths, min(8, len(paths))):
            lines = file_lines(fleet["workdir"], path, cache)
            if path not in said:            # each line's words once per canary
                said[path] = [] if isinstance(lines, str) else [
                    (i, words(text)) for i, text in enumerate(lines, 1)
                    if len(text.strip()) >= 8 and (os.path.normpath(path), i) not in near]
            spots = [i for i, line_words in said[path] if not line_words & words(f.claim + " " + f.quote)]
            if spots:
                i, top = rng.choice(spots), min(max(g.k for g in findings if g.worker == f.worker) + 3, 10 ** 9 - 1)
                k = next((k for k in (rng.randint(1, top) for _ in range(100)) if "W%d.F%d" % (f.worker, k) not in taken),
                         None)
                if k is None:
                    continue
                taken.add("W%d.F%d" % (f.worker, k))
                return Finding(worker=f.worker, k=k, path=path, line=i, end=i, claim=f.claim, rest=[],
                               quote=lines[i - 1].strip(), citation="ok", rounds=[], canary=f.id, finders=[f.worker])
    return None


def snapshot(fleet, cache):
    """shared/verify/workdir: orch's copy of the files the findings cite, as
    read at collection (`cache`): the workdir verifiers are given. Returns it."""
    tree, root = os.path.join(shared_dir(fleet), "verify", "workdir"), os.path.realpath(fleet["workdir"])
    os.makedirs(tree, mode=0o700, exist_ok=True)
    for path, lines in [kv for kv in cache.items() if isinstance(kv[1], list) and isinstance(kv[0], str)]:
        os.makedirs(os.path.dirname(os.path.join(tree, os.path.relpath(path, root))), mode=0o700, exist_ok=True)
        write_file(os.path.join(tree, os.path.relpath(path, root)), "".join(line + "\n" for line in lines))
    return tree


def verify_fleet(fleet, need, pool, timeout, emit, budget=None, check=None, check_timeout=600.0):
    """Citation check (and a write fleet's changes snapshotted and checked),
    then rounds until every finding and change has `need` counted verdicts
    that agree, or a strict majority, or no verifier is left to ask; returns the Matrix."""
    import glob
    findings, problems = collect_findings(fleet)
    cache, dropped, incomplete, digests, made = {}, {}, [], {}, []
    scopes = {w["n"]: scope_of(fleet, w, rel=True) for w in fleet["workers"]}     # scopes.json read once
    for f in findings:
        f.citation = check_citation(fleet["workdir"], f, cache)
        scope = scopes.get(f.worker)
        if f.path and scope and not any(in_scope(os.path.normpath(f.path), x) for x in scope):
            problems.append("%s cites %s, outside W%d's scope (%s)" % (f.id, f.path, f.worker, ", ".join(scope)))
    findings += collect_changes(fleet, check, check_timeout, problems)
    vdir = os.path.join(shared_dir(fleet), "verify")
    if os.path.islink(vdir) or os.path.isdir(vdir) and os.listdir(vdir):   # a planted link, a re-run
        archive(vdir)
    for old in glob.glob(os.path.join(glob.escape(shared_dir(fleet)), "w*", "r*.*")):  # the last run's verdicts
        if re.search(r"/w\d+/r\d+\.(result\.md|done)$", old):
            archive(old)
    tree, root = snapshot(fleet, cache), os.path.realpath(fleet["workdir"])
    cache[None] = True
    import random
    profiles = {w["n"]: w["profile"] for w in fleet["workers"]}
    rng, taken, canaries, stamped = random.Random(os.urandom(16)), set(), [], {}   # canaries a re-run cannot know
    taken.update(f.id for f in findings)
    taken.update(a for f in findings for a in f.also)
    k = 0
    while True:
        jobs, extra = {}, {}
        for f in findings:
            yes, no, _ = majority(f, dropped)
            if f.citation in ("ok", "n/a") and not (yes + no >= need and yes != no):
                v = next_verifier(f, pool, len(fleet["workers"]), dropped, profiles)
                if v is not None:
                    jobs.setdefault(v, []).append(f)
                    extra[f.id] = adjudication(f, dropped)
        if not jobs:
            break
        k += 1
        planted = {v: plant_canary(fleet, findings, v, jobs[v], taken, cache, rng) for v in sorted(jobs)}
        for v in [v for v in sorted(jobs) if not planted[v]]:  # else a change the lead's check broke: known false
            broke = [f for f in findings if f.citation == "BREAKS-CHECK" and f.worker != v]
            f = rng.choice(broke) if broke else None
            planted[v] = f and Finding(worker=f.worker, k=0, claim=f.claim, quote="", rest=[], rounds=[], also=[],
                                       citation="n/a", canary=f.id, finders=[f.worker], change=f.change)
        briefed = {}
        for v, fs in jobs.items():          # the canary at a place among the others that varies
            at = rng.randrange(len(fs) + 1)
            briefed[v] = fs[:at] + [planted[v]] * bool(planted[v]) + fs[at:]
            if not planted[v] and not all(f.change for f in fs):
                problems.append("round %d: no canary in W%d's brief: the cited files have no line to plant "
                                "one on" % (k, v))
        if os.path.islink(vdir) or not os.path.isdir(vdir):     # swapped mid-run: briefs stay in shared/
            if os.path.lexists(vdir):
                problems.append("round %d: shared/verify was replaced (by a link?): moved aside to %s"
                                % (k, archive(vdir)))
            snapshot(fleet, cache)
        trees = {(v, f.id): detached(fleet, "check-r%d-w%d-c%d" % (k, v, f.worker), f.change["commit"])
                 for v, fs in briefed.items() for f in fs if f.change}
        made += trees.values()
        outcome = run_round(fleet, k, briefed, timeout, emit, problems, extra, budget, tree, trees)
        incomplete += outcome.incomplete
        digests.update({(k, v): d for v, d in outcome.digests.items()})
        for v, fs in briefed.items():
            for f in fs:
                verdict = outcome.verdicts[v].get(f.id) or Verdict(verdict="MISSING", why="", quote="",
                                                                   evidence="", rest=[])
                verdict.round, verdict.verifier, verdict.family = k, v, profiles[v]
                verdict.check = "not W%d's: %s" % (v, verdict.forged) if verdict.forged else check_evidence(
                    (fleet["git"]["repo"], f.change["commit"]) if f.change else fleet["workdir"], verdict, cache, f)
                f.rounds.append(verdict)
                if verdict.check.startswith("fabricated") and v not in dropped:
                    dropped[v] = "round %d: %s %s" % (k, f.id, verdict.check)
        for v, canary in planted.items():   # a verifier that confirms a planted false finding rubber-stamps
            if canary:
                verdict = canary.rounds[-1]
                canaries.append(canary)
                if verdict.verdict == "CONFIRMED" and not verdict.forged:
                    stamped[v] = stamped.get(v, 0) + 1
                    dropped[v] = "round %d: confirmed a planted false finding (%s)" % (k, canary.id)
        log_event(fleet, "round", round=k, checked=sum(len(x) for x in jobs.values()),
                  dropped=sorted(dropped))
    for tree in made:                   # the verifiers' checkouts: orch's, and read
        drop_tree(fleet, tree)
    for f in [f for f in findings if f.change and f.citation == "n/a" and not intact(fleet, f.change["commit"])]:
        f.citation = "UNVERIFIABLE"
        problems.append("%s: its snapshot's objects were rewritten in the object store during verification: what "
                        "the verifiers read may not be the change; run `git fsck`, then verify again" % f.id)
    for path, lines in [kv for kv in cache.items() if isinstance(kv[1], list) and isinstance(kv[0], str)]:
        if (read_untrusted(path)[0] or "").splitlines() != lines:
            problems.append("%s changed in the workdir after orch collected the findings: verification judged "
                            "orch's copy" % os.path.relpath(path, root))
    for k_v in sorted(kv for kv, d in digests.items() if d != (
            file_digest(worker_file(fleet, kv[1], "r%d.result.md" % kv[0])),
            file_digest(worker_file(fleet, kv[1], "r%d.done" % kv[0])))):
        problems.append("W%d's round %d verdicts changed after orch read them: orch's copy counts" % k_v[::-1])
    for f in findings + canaries:
        for v in f.rounds:
            v.counts = is_counted(v, dropped) and not f.canary
            v.why_not = "" if v.counts else v.check if v.check != "checked" else "" if f.canary else (
                "not decisive" if v.verdict == "UNVERIFIABLE" else "dropped: " + dropped[v.verifier])
        f.final = None if f.canary else final_verdict(f, dropped)
    tally = {word: sum(f.final == word for f in findings if not f.change) for word in FINALS}
    undecided = [f.id for f in findings if f.final == "UNVERIFIABLE"] if incomplete else []
    return Matrix(fleet["name"], k, need, pool, findings, tally, dropped,
                  reliability(fleet, findings, dropped, stamped), incomplete, undecided, problems, now_iso(), canaries)


def reliability(fleet, findings, dropped, stamped):
    """{worker: Reliability}: as finder (each finder of a finding found twice)
    and as verifier (`stamped`: how many canaries it confirmed), how far its word held."""
    table = {w["n"]: collections.Counter(canaries_confirmed=stamped.get(w["n"], 0)) for w in fleet["workers"]}
    for f in findings:
        key = {"BAD-CITATION": "bad_citations", "REFUTED": "refuted", "CONFIRMED": "confirmed",
               "DISPUTED": "disputed"}.get(f.final)
        for n in f.finders or [f.worker]:
            table[n]["findings"] += 1
            if key:
                table[n][key] += 1
        for v in f.rounds:
            t = table[v.verifier]
            t["verdicts"] += 1
            kind = v.check.split(":")[0]
            if kind in ("unsupported", "missing", "fabricated"):     # not "not W<v>'s": another wrote it
                t[kind] += 1
            elif v.counts:
                t["decisive"] += 1
                t["outvoted"] += f.final in ("CONFIRMED", "REFUTED") and v.verdict != f.final
    return {n: Reliability(*[t[k] for k in RELIABILITY], dropped=n in dropped) for n, t in table.items()}


def matrix_json(matrix):
    """The Matrix as matrix.json holds it."""
    return dict(matrix._asdict(), findings=[f.matrix_json() for f in matrix.findings],
                reliability={n: t._asdict() for n, t in matrix.reliability.items()},
                canaries=[c.matrix_json() for c in matrix.canaries])


def unreliable(matrix):
    """One line per worker whose word did not hold."""
    out = []
    for n, t in sorted(matrix.reliability.items()):
        if t.bad_citations or t.refuted:
            out.append("W%s as finder: %d of %d findings refuted, %d with bad citations"
                       % (n, t.refuted, t.findings, t.bad_citations))
        if t.canaries_confirmed:
            out.append("W%s as verifier: confirmed a planted false finding, so none of its verdicts count" % n)
        if t.fabricated or t.outvoted or t.unsupported or t.missing:
            out.append("W%s as verifier: of %d verdicts %d fabricated evidence%s, %d outvoted, %d "
                       "unsupported, %d missing" % (n, t.verdicts, t.fabricated, " (dropped)" if t.dropped else "",
                                                    t.outvoted, t.unsupported, t.missing))
    return out


def tally_line(matrix):
    """The one-line tally: of the findings, and of the changes where there are any."""
    changes = [f.final for f in matrix.findings if f.change]
    line = "%d findings: %s" % (len(matrix.findings) - len(changes), ", ".join(
        "%d %s" % (matrix.tally[word], word.lower().replace("-", " ")) for word in FINALS))
    return line + ("; %d changes: %s" % (len(changes), ", ".join(
        "%d %s" % (changes.count(word), word.lower().replace("-", " ")) for word in CHANGE_FINALS)) if changes else "")


def verdict_cell(v):
    """One verdict as the matrix shows it: round, verifier, its agent family, word, why it does not count."""
    return "r%d W%s (%s) %s%s" % (v.round, v.verifier, v.family, v.verdict, " (%s)" % v.why_not.split(":")[0]
                                  if v.why_not and v.why_not != "not decisive" else "")


def matrix_markdown(matrix):
    """The Verification Matrix, both sides of each DISPUTED finding, the reliability table."""
    head = ["finding", "location", "claim", "citation", "verdicts", "final"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in matrix.findings:
        said = [verdict_cell(v) for v in f.rounds]
        row = [f.id, "commit " + f.change["commit"][:12] if f.change else place(f),
               f.claim[:60] + (" (also %s)" % ", ".join(f.also) if f.also else ""), f.citation,
               "; ".join(said) or "-", "**%s**" % f.final]
        rows.append("| " + " | ".join(x.replace("|", "\\|") for x in row) + " |")
    lines = ["# Verification Matrix: fleet %s" % matrix.fleet, "", tally_line(matrix), ""] + rows
    disputed = [f for f in matrix.findings if f.final == "DISPUTED"]
    if disputed:
        lines += ["", "## Disputed: the lead must look", ""]
        for f in disputed:
            lines += ["- %s %s %s" % (f.id, place(f), f.claim)] + [
                "  - W%d %s: %s:%d %s (%s)" % (v.verifier, v.verdict, v.path, v.line,
                                              json.dumps(v.quote, ensure_ascii=False), v.why or "-")
                for v in f.rounds if v.counts]
    changes = [f for f in matrix.findings if f.change]
    if changes:
        lines += ["", "## Changes: what each worker's snapshot holds", "",
                  "Each is a commit of orch's (on base) of the worker's worktree as verify found it, under "
                  "refs/orch/%s/w<n>: what was verified is what `orch merge` takes." % matrix.fleet, "",
                  "| change | commit | diff | size | scope | check on base | check on change | final |",
                  "|---|---|---|---|---|---|---|---|"]
        for f in changes:
            c, check = f.change, f.change.get("check") or {}
            row = [f.id, c["commit"], c["diff"], change_line(Change(**{k: c[k] for k in Change._fields})),
                   ", ".join(c["scope"]) or "any", check.get("base", {}).get("outcome", "-"),
                   check.get("change", {}).get("outcome", "-"), "**%s**" % f.final]
            lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in row) + " |")
        for f in [f for f in changes if f.change.get("check")]:
            lines += ["", "%s: `%s` on the change, last lines:" % (f.id, f.change["check"]["command"])] + fenced(
                f.change["check"]["change"]["tail"].split("\n"))
    lines += ["", "## Canaries: findings orch planted, known false", ""]
    if matrix.canaries:
        lines += ["A canary borrows a real finding's claim and puts it on another line, or is a change the lead's "
                  "check broke. A verifier that confirms one has rubber-stamped: none of its verdicts count.", "",
                  "| canary | planted at | claim of | verdict |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(x.replace("|", "\\|") for x in (
            c.id, "commit " + c.change["commit"][:12] if c.change else place(c), c.canary,
            "; ".join(verdict_cell(v) for v in c.rounds))) + " |" for c in matrix.canaries]
    else:
        lines.append("None planted.")
    head = ["worker"] + [k.replace("_", " ") for k in RELIABILITY]
    lines += ["", "## Reliability", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, t in sorted(matrix.reliability.items()):
        lines.append("| W%s%s | %s |" % (n, " (confirmed a planted false finding)" if t.canaries_confirmed else
                                         " (dropped)" if t.dropped else "",
                                         " | ".join(str(getattr(t, k)) for k in RELIABILITY)))
    lines += [""] + ["Unreliable: " + u for u in unreliable(matrix)]
    if matrix.problems:
        lines += ["", "Problems:"] + ["- " + p for p in matrix.problems]
    return defang("\n".join(lines) + "\n")


def write_matrix(fleet, matrix):
    """The matrix goes to the run dir, which no brief sends a worker to (the
    record report reads), and a copy to shared/ for the workers and the lead."""
    text = matrix_markdown(matrix)
    for where in (fleet["run"], shared_dir(fleet)):
        write_json(os.path.join(where, "matrix.json"), matrix_json(matrix))
        write_file(os.path.join(where, "matrix.md"), text)


# --- report --------------------------------------------------------------------

def fenced(lines):
    """Worker text as a Markdown code block whose fence is longer than any run
    of backticks in it: it cannot close it, nor make headings, tables or comments."""
    fence = "`" * max([3] + [len(run) + 1 for run in re.findall(r"`+", "\n".join(lines))])
    return [fence] + lines + [fence]


def write_report(fleet):
    """report.md from orch's own record of the matrix, each worker's result
    (read as untrusted) and the bus; says when shared/matrix.md was changed."""
    shared = shared_dir(fleet)
    out = ["# Report: fleet %s" % fleet["name"], "",
           "%s; workdir %s; %d workers (%s)" % (now_iso(), fleet["workdir"], len(fleet["workers"]),
                                                fleet["agent"]), "", "## Verification", ""]
    matrix = read_text(os.path.join(fleet["run"], "matrix.md"))
    if matrix and read_untrusted(os.path.join(shared, "matrix.md"))[0] != matrix:
        out += ["Note: shared/matrix.md is not what verify wrote (a worker changed it); this "
                "report shows orch's own record.", ""]
    out += [matrix.split("\n", 1)[1].strip() if matrix else
            "Not verified: nothing below has been checked by a second worker. Run `orch verify %s`."
            % fleet["name"], "", "## Worker results", ""]
    for w in fleet["workers"]:
        n = w["n"]
        text, why, changed = result_of(fleet, n)
        out += ["### W%d (%s)" % (n, "done" if is_done(fleet, n) else "NOT done"), ""] + \
            ["Note: %s." % changed, ""] * bool(changed) + \
            fenced([(text or "(no result file)").strip()]) + ["(%s)" % why] * bool(why) + [""]
    merge_outboxes(fleet)
    out += ["## Bus", ""] + fenced(bus_tail(fleet)) + [""]
    rows = [offline_row(fleet, w) for w in fleet["workers"]]
    out += ["## Cost", "", "| worker | agent | cost | context |", "|---|---|---|---|"] + [
        "| W%d | %s | %s | %s |" % (r.n, w["profile"], money(r.cost_usd), percent(r.context_pct))
        for r, w in zip(rows, fleet["workers"])] + ["", "Known total: %s" % fleet_cost(rows)[1], ""]
    text, path = defang("\n".join(out)), os.path.join(shared, "report.md")
    write_file(path, text)
    log_event(fleet, "report", path=path)
    return text, path


# --- commands, in --help order -------------------------------------------------

def notes(fleet):
    """The notes a command gathered on the fleet's files (damaged state), as
    lines for stderr, once."""
    return "".join("orch: note: %s\n" % note for note in fleet.pop("notes", []))


def row_json(r, change=None):
    """A worker's Row as `status --json` shows it (and, in a write fleet, its Change)."""
    out = {k: getattr(r, k) for k in ("n", "pane", "state", "done", "quiet", "last", "resets", "cost_usd",
                                      "context_pct")}
    out["reported_ago"] = None if r.reported is None else max(0, round(time.time() - r.reported, 1))
    out["foreign"] = [{"owner": o, "file": f} for o, f in r.foreign]
    if change:
        out["change"] = change._asdict()
    return out


def cmd_spawn(a):
    name = check_name(a.name)
    workdir = os.path.abspath(a.workdir or os.getcwd())
    if not os.path.isdir(workdir):
        raise OrchError("workdir %s is not a directory: create it or pass another" % workdir, 2)
    if re.search(r"[`\x00-\x1f\x7f]|;$", workdir):     # briefs quote it in backticks
        raise OrchError("workdir %r has a backtick, control character or trailing ';' that "
                        "briefs and tmux cannot carry: rename it or use a symlink" % workdir, 2)
    agent = a.agent if a.agent is not None else os.environ.get("ORCH_AGENT") or "claude"
    checked_profile(agent)
    facts = repository(workdir) if a.worktrees else None
    orch_home(create=True)
    rd = run_dir(name)
    live = session_of(name) in live_sessions()
    if live or (os.path.isdir(rd) and os.listdir(rd)):
        if not a.force:
            what = "is live" if live else "has an old workspace in %s" % rd
            raise OrchError("fleet %r %s: run `orch kill %s` first (the workspace stays), or "
                            "pass --force to archive it" % (name, what, name))
        if live and (not os.path.exists(os.path.join(rd, "fleet.json"))
                     or session_home(session_of(name)) not in ("", orch_home())):
            raise OrchError("tmux session %s is live but is no fleet of ORCH_HOME %s (another "
                            "ORCH_HOME's?): pick another name, or end it with `tmux kill-session "
                            "-t %s`" % (session_of(name), orch_home(), session_of(name)))
        trees = os.path.join(rd, "worktrees")
        if os.path.isdir(trees) and os.listdir(trees):      # archiving would cut them off from git
            raise OrchError("fleet %r has worktrees in %s: `orch clean %s` removes those whose change is merged "
                            "or empty, `orch clean %s --force` all of them; then spawn again" % (name, trees, name, name))
        if live:
            lead_only({"name": name, "run": run_dir(name)}, "spawn --force")
            print(end_fleet(name, unrecorded_ok=True))
        if os.path.isdir(rd):
            print("%s: archived the old run to %s" % (name, archive(rd)))
    for sub in ("shared/verify", "logs"):
        os.makedirs(os.path.join(rd, sub), mode=0o700, exist_ok=True)
    isolate, why = (False, "--no-isolate") if a.no_isolate else isolation()
    fleet = {"version": SCHEMA, "id": os.urandom(6).hex(), "name": name, "session": session_of(name),
             "workdir": workdir, "agent": agent, "per_window": a.per_window, "created": now_iso(),
             "workers": [], "run": rd, "isolate": isolate, "isolation": why, "git": facts}
    post(fleet, "orch", "fleet %s: %d workers in %s" % (name, a.N, workdir))
    log_event(fleet, "spawn", workers=a.N, agent=agent, workdir=workdir, isolate=isolate)
    save_env(fleet)
    print(isolation_line(fleet), flush=True)
    if facts:
        print("%s: write fleet from base %s (HEAD of %s): worker n works in %s on branch %s" % (
            name, facts["base"][:12], facts["repo"], worktree_of(fleet, "<n>"), branch_of(fleet, "<n>")))
        dirty = [p for p in git(workdir, "--no-optional-locks", "status", "--porcelain", "-z").split("\0") if p]
        if dirty:
            print("%s: note: the lead's checkout has uncommitted changes (%d path(s)) that the worktrees do not "
                  "have: commit them first if the workers need them" % (name, len(dirty)))
    print(require_ready(fleet, add_workers(fleet, a.N, agent, a.timeout), a.timeout))


def cmd_add(a):
    fleet = load_fleet(a.name)
    lead_only(fleet, "add")
    if fleet["session"] not in live_sessions():
        raise OrchError("fleet %r is not live: `orch spawn %s N --force` starts it again"
                        % (a.name, a.name))
    if a.refresh_env:
        save_env(fleet)
    waiting = add_workers(fleet, a.K, fleet["agent"] if a.agent is None else a.agent, a.timeout)
    print(require_ready(fleet, waiting, a.timeout))


def cmd_send(a):
    fleet = load_fleet(a.name)
    lead_only(fleet, "send")
    ns = [w["n"] for w in pick_workers(fleet, a.worker)]
    if a.file and a.message:
        raise OrchError("give the message as words or with --file, not both", 2)
    if a.file and not os.path.isfile(a.file):
        raise OrchError("--file %s: no such file" % a.file, 2)
    text = read_text(a.file, "") if a.file else sys.stdin.read() if a.message == ["-"] \
        else " ".join(a.message)
    if a.interrupt:
        interrupt(fleet, ns)
    try:
        print("\n".join(send_text(fleet, ns, text)))
    finally:
        sys.stderr.write(notes(fleet))


def cmd_brief(a):
    fleet = load_fleet(a.name)
    lead_only(fleet, "brief")
    n = pick_workers(fleet, a.worker, allow_all=False)[0]["n"]
    if not a.goal.strip():
        raise OrchError("--goal is empty: say what the worker should determine", 2)
    if re.search(LEADING_PATTERN, a.goal):
        print("orch: note: the goal presumes its answer; phrase it as 'determine whether ...' "
              "so the worker does not invent a bug to fix", file=sys.stderr)
    scope = [checked_scope(x) for x in a.scope]         # bad input changes nothing
    path, result, done = [worker_file(fleet, n, s) for s in ("task.md", "result.md", "done")]
    for old in (done, result, kept_path(fleet, "w%d.result.md" % n)):
        with contextlib.suppress(FileNotFoundError):    # a brief written at once moved it first
            if os.path.lexists(old):    # a new task: the last one's flag must not answer `wait`
                archive(old)
    with updating(fleet, "scopes.json") as scopes:      # briefs written at once each keep theirs
        scopes[str(n)] = scope
    text = make_brief(fleet, n, a.role, clean_text(a.goal), [clean_text(c) for c in a.constraint], result, done,
                      scope=scope)
    write_file(path, text)
    keep(fleet, "agent-%d.task.md" % n, text)       # what the brief said, whatever becomes of the file
    log_event(fleet, "brief", worker=n, role=a.role)
    with contextlib.suppress(OrchError):        # a fleet that is not live has no pane to label
        if n in capture_panes(fleet, [fleet["workers"][n - 1]]):     # still n's pane
            tmux("set-option", "-p", "-t", fleet["workers"][n - 1]["pane"], "@orch_task", task_label(fleet, n))
    print("W%d: brief written to %s" % (n, path))
    if a.send:
        print("\n".join(send_text(fleet, [n], brief_message(path))))


def checked_scope(path):
    """A --scope path, normalised: relative to the workdir and inside it."""
    rel = os.path.normpath(path.strip())
    if not path.strip() or os.path.isabs(rel) or rel == ".." or rel.startswith("../") or re.search(
            "[\n\t%s%s%s`]" % (CONTROLS, BIDI, INVISIBLE), rel):
        raise OrchError("--scope %r: give a path relative to the workdir and inside it, with no control "
                        "character or backtick" % path, 2)
    return rel


def cmd_read(a):
    fleet = load_fleet(a.name)
    ws = pick_workers(fleet, a.worker)
    captures = capture_panes(fleet, ws, ansi=False)
    for w in ws:
        capture = captures.get(w["n"])
        lines = capture.screen.rstrip().split("\n") if capture else []
        if len(ws) > 1:                 # each screen indented: no screen line can pass for a header
            print("--- W%d %s%s" % (w["n"], w["pane"], "" if capture else " (gone)"))
        print(defang("\n".join((line.rstrip() and "  " * (len(ws) > 1)) + line.rstrip()
                                for line in lines[-a.lines:])))


def cmd_log(a):
    """What each worker did, as its agent's hooks told orch (Claude Code):
    prompts, tools and the files they touched, turn ends, failures, compactions."""
    fleet = load_fleet(a.name)
    said = []
    for n in [w["n"] for w in pick_workers(fleet, a.worker or "all")]:
        path = os.path.join(state_dir(fleet, n), "hooks.jsonl")
        start = max(0, os.path.getsize(path) - READ_CAP) if os.path.isfile(path) else 0
        if start:
            print("orch: note: W%d's hooks.jsonl is over %d MB: its last %d MB follow" % ((n,) + (READ_CAP >> 20,) * 2),
                  file=sys.stderr)
        for line in (read_lines(path, start)[0] or [])[1 if start else 0:]:
            with contextlib.suppress(ValueError, TypeError, RecursionError):
                rec = dict(json.loads(line), worker=n)      # the file says whose it is
                if hook_line(rec) is not None:
                    said.append((str(rec.get("t")), len(said), rec))
    for _, _, rec in sorted(said):          # in time order, each worker's in its own order
        print(safe_json(rec) if a.json else hook_line(rec))


def cmd_status(a):
    if not a.name:
        fleets = fleet_summaries()
        if a.json:
            print(safe_json({"fleets": [{k: v for k, v in f._asdict().items() if v is not None} for f in fleets]}, 2))
            return
        if not fleets:
            print("no fleets in %s: `orch spawn NAME N` starts one" % os.path.join(orch_home(), "runs"))
        for f in fleets:
            if f.error:
                print("%-32s  broken: %s" % (f.name, f.error))
            else:
                print("%-32s  %-8s %d/%d done  %s  %s" % (f.name, "live" if f.live else "ended",
                      f.done, f.workers, f.agent, f.workdir))
        return
    fleet = load_fleet(a.name)
    try:
        rows, live = poll(fleet, a.stall, ended_ok=False), True
    except OrchError as e:
        if e.kind != "target":
            raise
        foreign = foreign_writes(fleet)
        rows, live = [offline_row(fleet, w, foreign.get(w["n"], [])) for w in fleet["workers"]], False
    merge_outboxes(fleet)
    changes = {r.n: worker_change(fleet, r.n) for r in rows}
    bus, (total, spent) = bus_tail(fleet, 5), fleet_cost(rows)
    needs = [(r.n,) + needs_lead(fleet, r) for r in rows if live and needs_lead(fleet, r)] + unanswered(fleet)
    sys.stderr.write(notes(fleet))
    if a.json:
        print(safe_json({"fleet": fleet["name"], "session": fleet["session"], "live": live,
                         "isolated": bool(fleet.get("isolate")), "isolation": fleet.get("isolation"),
                         "workdir": fleet["workdir"], "shared": shared_dir(fleet), "cost_usd": total,
                         "workers": [row_json(r, changes[r.n]) for r in rows],
                         "bus": bus, "attention": [
                             {"worker": n, "why": why, "command": command} for n, why, command in needs]}, 2))
        return
    print("fleet %s (%s, %s) workdir %s" % (fleet["name"], fleet["session"],
          "live" if live else "not live", fleet["workdir"]))
    print(isolation_line(fleet).split(": ", 1)[1])
    for r in rows:
        flags = time.strftime("resets %H:%M | ", time.localtime(r.resets)) if r.resets else ""
        if r.reported and r.state not in ("idle", "done", "exited") and time.time() - r.reported > STALE:
            flags += "cost as of %ds ago | " % (time.time() - r.reported)       # its status line has not run since
        if (r.context_pct or 0) >= CONTEXT_HIGH:
            flags += "CONTEXT %d%%: hand its work to a fresh worker | " % r.context_pct
        flags += "".join("WROTE %s's %s | " % ("W%d" % o if o else "orch", os.path.relpath(f, shared_dir(fleet)))
                         for o, f in r.foreign[:3]) + ("and %d more | " % (len(r.foreign) - 3)
                                                       if len(r.foreign) > 3 else "")
        print("  W%-3d %-5s %-10s %-4s %6s %7s %4s  %s%s" % (
            r.n, r.pane or "-", r.state, "done" if r.done else "-", "-" if r.quiet is None else "%ds" % r.quiet,
            money(r.cost_usd, "-"), percent(r.context_pct, "-"), defang(flags), defang(r.last[:100])))
        if changes[r.n]:
            print("        change: %s" % change_line(changes[r.n]))
    print("cost: %s" % spent)
    print("bus (last %d):" % len(bus))
    for line in bus:
        print("  " + line)
    for n, why, command in needs:
        print("needs the lead: %s: `%s`" % (why, command))


def worker_change(fleet, n):
    """Worker n's change now, for status: a Change (None: not a write fleet, or its worktree is gone)."""
    w = fleet["workers"][n - 1]
    if not fleet.get("git") or not os.path.lexists(worktree_of(fleet, n)):
        return None
    try:
        return change_of(fleet, n, change_tree(fleet, n), scope_of(fleet, w))
    except OrchError as e:              # a file git cannot take (a FIFO), a worktree made a link
        fleet.setdefault("notes", []).append("W%d's change cannot be read: %s" % (n, e))
        return None


def cmd_wait(a):
    fleet = load_fleet(a.name)
    ns = sorted({pick_workers(fleet, n, allow_all=False)[0]["n"] for n in a.workers}) \
        or [w["n"] for w in fleet["workers"]]
    flags, needs = {n: worker_file(fleet, n, "done") for n in ns}, []

    def emit(e):
        needs.extend([e] if e.why else [])
        print(event_line(e, a.json), flush=True)
    code = wait_loop(fleet, flags, a.timeout, a.interval, a.stall, a.nudge and (lambda n: default_nudge(fleet, n)),
                     emit, a.budget, a.attention)
    first = needs[0] if code == 6 else None
    sys.stderr.write(notes(fleet))
    if a.json:
        out = {"t": now_iso(), "result": {0: "done", 3: "timeout", 4: "exited", 6: "attention"}[code], "workers": ns}
        if first:
            out.update(worker=first.n, state=first.row.state if first.row else first.kind, why=first.why,
                       command=first.command)
        print(safe_json(out), flush=True)
    else:
        print("%s %s: %s" % (time.strftime("%H:%M:%S"), fleet["name"], {
            0: "all done", 3: "timed out after %gs" % (a.timeout or 0),
            4: "a worker exited without its done flag: `orch read %s all`, `orch respawn %s N`"
               % (fleet["name"], fleet["name"]),
            6: first and "W%s needs the lead (%s): %s: `%s`" % (
                first.n or "?", first.row.state if first.row else first.kind, first.why, first.command)}[code]))
    return code


def cmd_nudge(a):
    fleet = load_fleet(a.name)
    lead_only(fleet, "nudge")
    n = pick_workers(fleet, a.worker, allow_all=False)[0]["n"]
    text = " ".join(a.message) or default_nudge(fleet, n)
    try:
        print("\n".join(send_text(fleet, [n], text, clear=True)))
    finally:
        note_nudge(fleet, n, time.time())
        log_event(fleet, "nudge", worker=n, why="lead")


def cmd_bus(a):
    fleet = load_fleet(a.name)
    bus, me = bus_path(fleet), inside_worker(fleet)
    who = a.who or ("W%d" % me if me else "lead")
    if me is not None and who != "W%d" % me:
        refuse(fleet, me, "bus --as %s" % who)
    if a.message[:1] == ["post"]:
        text = clean_text(" ".join(a.message[1:])).replace("\n", " ").replace("\t", " ").strip()
        if not text:
            raise OrchError("nothing to post: `orch bus %s post MESSAGE`" % a.name, 2)
        if me:                          # a worker's line goes to its outbox: orch merges it
            append_line(worker_file(fleet, me, "bus.md"), text)
            return
        merge_outboxes(fleet)           # what workers posted before comes first
        post(fleet, who, text)
        log_event(fleet, "bus", who=who, chars=len(text))
        return
    if a.message:
        raise OrchError("unknown bus action %r: `orch bus %s` reads, `orch bus %s post MESSAGE` "
                        "posts" % (a.message[0], a.name, a.name), 2)
    cursors = "workers/w%d/bus-cursors.json" % me if me else "bus-cursors.json"   # a worker's are its own
    start = read_state(os.path.join(fleet["run"], cursors), fleet).get(who, 0) if a.new else 0
    if not isinstance(start, int) or start < 0:
        start = 0
    while True:
        if not me:
            merge_outboxes(fleet)
        st = os.lstat(bus) if os.path.lexists(bus) else None
        if not (st and stat.S_ISREG(st.st_mode)):
            raise OrchError("cannot read %s: %s" % (bus, "not a regular file" if st else "no such file"))
        if start and start > st.st_size:    # rewritten with > instead of >>
            fleet.setdefault("notes", []).append("bus.md shrank or was replaced since %s last read it: "
                                                 "here is all of it" % who)
            start = 0
        sys.stderr.write(notes(fleet))
        posts, start = bus_posts(fleet, start)      # never half a line
        lines = [shown(p) for p in posts]
        if not a.follow and not a.new:
            lines = lines[len(lines) - a.n:] if a.n < len(lines) else lines
        for line in lines:
            print(line, flush=True)
        if a.new:
            with updating(fleet, cursors) as state:    # readers of other names too
                state[who] = start
        if not a.follow or fleet["session"] not in live_sessions():
            return
        time.sleep(0.5)


def cmd_verify(a):
    fleet = load_fleet(a.name)
    lead_only(fleet, "verify")
    count = len(fleet["workers"])
    if count < 2:
        raise OrchError("verification needs at least 2 workers, so that no worker checks its own "
                        "findings: `orch add %s` adds one" % a.name)
    pool = list(range(1, count + 1))
    if a.by:
        try:
            pool = sorted({int(v) for v in a.by.split(",")})
        except ValueError:
            pool = [0]
        if not all(1 <= v <= count for v in pool):
            raise OrchError("--by %s: give worker numbers 1-%d separated by commas" % (a.by, count), 2)
    need = a.verdicts or max(1, min(2, len(pool) - 1))
    if need > max(1, len(pool) - 1):
        raise OrchError("--verdicts %d: a finding needs that many verdicts from distinct verifiers "
                        "other than its finder, and %d verifiers allow at most %d"
                        % (need, len(pool), max(1, len(pool) - 1)), 2)
    if not any(is_done(fleet, w["n"]) for w in fleet["workers"]):
        raise OrchError("no worker of %r has a done flag yet: `orch wait %s` first" % (a.name, a.name))
    check = check_argv(fleet, a.check)

    def emit(e):                        # a closed stdout (`verify | head -1`) must not stop the rounds
        try:
            print(event_line(e), flush=True)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    with alone(fleet, "verify"):
        matrix = verify_fleet(fleet, need, pool, a.timeout, emit, a.budget, check, a.check_timeout)
        write_matrix(fleet, matrix)
    log_event(fleet, "verify", need=need, **{word.lower(): count for word, count in matrix.tally.items()})
    sys.stderr.write(notes(fleet))
    for p in matrix.problems:
        if not (matrix.undecided and p in matrix.incomplete):      # said once, below
            print("orch: warning: %s" % defang(p), file=sys.stderr)
    print(tally_line(matrix))
    print("matrix: %s" % os.path.join(shared_dir(fleet), "matrix.md"))
    if matrix.undecided:
        raise OrchError("verification incomplete: %s left undecided because %s: look with `orch "
                        "status %s`, then `orch verify %s` again" % (
                            ", ".join(matrix.undecided), "; ".join(matrix.incomplete), a.name, a.name))


@contextlib.contextmanager
def alone(fleet, what):
    """While no other verify or merge of the fleet runs (they share its matrix and checkouts)."""
    lock = os.open(os.path.join(fleet["run"], "verify.lock"), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OrchError("a verify or merge of fleet %r is already running: let it finish, then run this %s "
                            "again" % (fleet["name"], what))
        yield
    finally:
        os.close(lock)


def check_argv(fleet, command):
    """--check CMD as argv (shlex, no shell); only for a write fleet."""
    import shlex
    if command is None:
        return None
    if not fleet.get("git"):
        raise OrchError("--check runs on the changes of a write fleet, and %r is none: spawn it with "
                        "--worktrees" % fleet["name"], 2)
    try:
        argv = shlex.split(command)
    except ValueError as e:
        argv, why = [], str(e)
    else:
        why = "it is empty"
    if not argv:
        raise OrchError("--check %r: %s: give a command, e.g. --check \"python3 -m pytest -q\"" % (command, why), 2)
    return argv


def cmd_report(a):
    text, path = write_report(load_fleet(a.name))
    print(text)
    print("report: %s" % path)


def cmd_respawn(a):
    fleet = load_fleet(a.name)
    lead_only(fleet, "respawn")
    w = pick_workers(fleet, a.worker, allow_all=False)[0]
    n = w["n"]
    saved = save_logs(dict(fleet, workers=[w]), "respawn")      # [n] while its pane is n's
    if a.refresh_env:
        save_env(fleet)
    end_processes(fleet, n)             # the old agent's daemons and children too
    if saved:
        tmux("respawn-pane", "-k", "-t", w["pane"], *pane_command(fleet, n))
    else:                               # pane closed by hand, or the session is gone
        old, w["pane"] = w["pane"], open_pane(fleet, n)
        save_fleet(fleet)
        print("W%d: pane %s was gone; new pane %s" % (n, old, w["pane"]))
    # respawn-pane keeps the pane id: forget the old agent's screen, or the new one counts as ready
    with updating(fleet, "watch.json") as memory:
        memory.pop(str(n), None)
    log_event(fleet, "respawn", worker=n, pane=w["pane"])
    waiting = wait_ready(fleet, {n}, a.timeout)
    if waiting:
        raise OrchError("W%d restarted but is %s: look with `orch read %s %d`"
                        % (n, waiting[0].shows, a.name, n))
    brief = worker_file(fleet, n, "task.md")
    if os.path.exists(brief) and not is_done(fleet, n):
        print("\n".join(send_text(fleet, [n], brief_message(brief))))
    print("W%d: restarted in pane %s" % (n, w["pane"]))


def write_fleet(name):
    """The fleet `name`, which must be a write fleet."""
    fleet = load_fleet(name)
    if not fleet.get("git"):
        raise OrchError("fleet %r changes no code (it has no worktrees): this is for fleets spawned with "
                        "--worktrees" % name, 2)
    return fleet


def cmd_merge(a):
    """orch/<name>/merged: base, then each CONFIRMED snapshot (as matrix.json,
    orch's own record, names it) in worker order, each re-checked with --check;
    the lead's checkout untouched but with --ff."""
    import shlex
    fleet = write_fleet(a.name)
    lead_only(fleet, "merge")
    g, check = fleet["git"], check_argv(fleet, a.check)
    ns = {pick_workers(fleet, n, allow_all=False)[0]["n"] for n in a.workers}
    record = read_state(os.path.join(fleet["run"], "matrix.json"))
    changes = sorted([f for f in record.get("findings") or [] if isinstance(f, dict) and isinstance(
        f.get("change"), dict) and isinstance(f.get("worker"), int) and re.match(
        r"[0-9a-f]{40,64}\Z", str(f["change"].get("commit"))) and (not ns or f["worker"] in ns)], key=lambda f: f["worker"])
    if not changes:
        raise OrchError("no verified change of fleet %r to merge: `orch verify %s --check CMD` first" % (a.name, a.name))
    branch = "refs/heads/orch/%s/merged" % a.name
    old = git(g["repo"], "rev-parse", "--verify", "-q", branch, codes=(0, 1)).strip()
    if old and old != fleet.get("merged"):
        raise OrchError("branch orch/%s/merged is at %s, which orch did not make: rename it (`git branch -m orch/%s/"
                        "merged NEW`) and merge again" % (a.name, old[:12], a.name))
    with alone(fleet, "merge"):
        head, said, merged = merge_changes(fleet, changes, check, a.check_timeout)
    print("\n".join(said))
    if not merged:
        raise OrchError("no change merged: orch/%s/merged is not made" % a.name)
    git(g["repo"], "update-ref", branch, head, old or "0" * 40)
    fleet["merged"] = head
    save_fleet(fleet)
    log_event(fleet, "merge", workers=merged, commit=head)
    print("orch/%s/merged at %s: %d change(s) on base %s%s" % (a.name, head[:12], len(merged), g["base"][:12],
                                                                 ", each passing `%s`" % shlex.join(check) if check else ""))
    hand_on = "git -C %s merge orch/%s/merged" % (shlex.quote(g["repo"]), a.name)
    if not a.ff:
        print("to take it: %s" % hand_on)
        return
    lead = git(fleet["workdir"], "symbolic-ref", "-q", "HEAD", codes=(0, 1)).strip()
    at = git(fleet["workdir"], "rev-parse", "HEAD").strip()
    dirty = git(fleet["workdir"], "--no-optional-locks", "status", "--porcelain").strip()
    if not lead or at != g["base"] or dirty:
        raise OrchError("--ff: the lead's checkout is %s: it is left as it is; to take the merge: %s" % (
            "on no branch" if not lead else "no longer at base %s" % g["base"][:12] if at != g["base"]
            else "not clean", hand_on))
    git(fleet["workdir"], "merge", "-q", "--ff-only", "--no-overwrite-ignore", head)   # the commit orch made
    print("fast-forwarded %s to orch/%s/merged" % (lead[len("refs/heads/"):], a.name))


def merge_changes(fleet, changes, check, timeout):
    """Base, then each change that may go in (CONFIRMED in orch's record, in
    scope, its objects intact), merged in a checkout of orch's and checked
    there: (the last commit, what became of each, the workers merged)."""
    import shlex
    g = fleet["git"]
    tree, said, merged = detached(fleet, "merge", g["base"]), [], []
    try:                                # the check runs the changes' code there: its .git file is theirs
        here = in_tree(fleet, tree)
        for f in changes:
            n, commit = f["worker"], f["change"]["commit"]
            scope = scope_of(fleet, fleet["workers"][n - 1]) if n in range(1, len(fleet["workers"]) + 1) else []
            why = "it is %s, not CONFIRMED" % f.get("final") if f.get("final") != "CONFIRMED" else None
            c = None if why else change_of(fleet, n, commit, scope)
            why = why or ("it leaves its scope or links out of the tree" if c.outside or c.escapes else None)
            why = why or (None if intact(fleet, commit) else "its snapshot's objects were rewritten after verify "
                          "(a worker can write the object store): run `git fsck`")
            if why:
                said.append("W%d.C: left out: %s" % (n, why))
                continue
            before = git(tree, "rev-parse", "HEAD", **here).strip()
            try:
                git(tree, "merge", "-q", "--no-ff", "-m", "orch: merge W%d's change (%s), verified" % (n, commit[:12]),
                    commit, env=identity(g["repo"]), **here)
            except OrchError:
                git(tree, "merge", "--abort", codes=(0, 128), **here)
                said.append("W%d.C: left out: it conflicts with the changes merged before it" % n)
                continue
            code = run_check(fleet, tree, check, timeout)[0] if check else 0
            git(tree, "reset", "-q", "--hard", "HEAD" if code == 0 else before, **here)   # orch's own checkout:
            git(tree, "clean", "-q", "-ffdx", **here)       # what the check wrote goes before the next
            if code != 0:
                said.append("W%d.C: left out: `%s` %s once it is merged" % (n, shlex.join(check), check_word(code)))
                continue
            merged.append(n)
            said.append("W%d.C: merged (snapshot %s)" % (n, commit[:12]))
        return git(tree, "rev-parse", "HEAD", **here).strip(), said, merged
    finally:
        drop_tree(fleet, tree)


def cmd_clean(a):
    """Remove the fleet's worktrees (each with its branch and commits) whose
    change is empty or merged, all of them with --force; snapshots and diffs stay."""
    fleet = write_fleet(a.name)
    lead_only(fleet, "clean")
    if fleet["session"] in live_sessions():
        raise OrchError("fleet %r is live: `orch kill %s` first (its worktrees stay)" % (a.name, a.name))
    g, merged = fleet["git"], fleet.get("merged")       # orch's record of what it merged, not the branch
    empty = git(g["repo"], "rev-parse", g["base"] + "^{tree}").strip()
    taken = {empty}
    for parents in git(g["repo"], "log", "--first-parent", "--format=%P", "%s..%s" % (g["base"], merged)
                       ).split("\n") if merged else []:
        if len(parents.split()) == 2:       # orch's merge commits: base side, then the snapshot
            taken.add(git(g["repo"], "rev-parse", parents.split()[1] + "^{tree}").strip())
    for w in fleet["workers"]:
        n, path = w["n"], worktree_of(fleet, w["n"])
        if not os.path.lexists(path):
            continue
        try:                            # its files now, and every commit it names: all empty or merged
            trees, why = {change_tree(fleet, n)} | tip_trees(fleet, n), None
        except OrchError as e:
            trees, why = {None}, "its change cannot be read: %s" % e
        kept = os.path.join(shared_dir(fleet), "changes", "w%d.diff" % n)
        if not a.force and not trees <= taken:
            print("W%d: kept %s: %s (%s)" % (n, path, why or "its change is neither empty nor merged",
                                            kept if os.path.exists(kept) else "no snapshot yet"))
            continue
        aside = drop_tree(fleet, path)
        print("W%d: %s %s with its branch %s (%s)" % (n, "could not remove all of" if aside else "removed", path,
              branch_of(fleet, n), "--force" if not trees <= taken else "its change is empty" if trees <= {empty}
              else "its change is merged") + ("; moved aside to %s" % aside if aside else ""))
    for left in glob_trees(fleet):          # orch's own checkouts, from a verify that was stopped
        drop_tree(fleet, left)
    log_event(fleet, "clean", force=a.force)


def glob_trees(fleet):
    import glob
    return [p for p in glob.glob(os.path.join(glob.escape(fleet["run"]), "worktrees", "*"))
            if re.search(r"/(check(-[a-z0-9-]+)?|merge)$", p)]


def cmd_kill(a):
    if a.all == bool(a.name):
        raise OrchError("name one fleet, or pass --all: `orch kill NAME`", 2)
    for name in [a.name] if a.name else fleet_names():
        lead_only({"name": name, "run": run_dir(name)}, "kill")
    live = live_sessions()
    names = [a.name] if a.name else [d for d in fleet_names() if session_of(d) in live]
    if a.all:                           # another ORCH_HOME's session of the same name is not ours to end
        names = [d for d in names if session_home(session_of(d)) in ("", orch_home())]
    for name in names:
        print(end_fleet(name))
        with contextlib.suppress(OrchError):
            if load_fleet(name).get("git"):
                print("%s: its worktrees, branches and snapshots stay: `orch merge %s`, then `orch clean %s`"
                      % (name, name, name))
    if a.all and not names:
        print("no live fleets")


def cmd_attach(a):
    fleet = load_fleet(a.name)
    if fleet["session"] not in live_sessions():
        raise OrchError("fleet %r is not live: `orch status %s` shows its last state" % (a.name, a.name))
    if os.environ.get("TMUX"):
        raise OrchError("already inside tmux: in another terminal run `tmux attach -r -t %s`"
                        % fleet["session"])
    os.execvp("tmux", ["tmux", "attach-session", "-r", "-t", "=" + fleet["session"]])


DEMO_FILES = {
    "api/handlers.py": "import json\n\n\ndef get_user(request):\n    # TODO: check the caller owns this user id\n"
                       "    uid = request.args['id']\n    return json.dumps({'id': uid})\n\n\n"
                       "def delete_user(request):\n    # FIXME: no audit log entry is written\n    return 204\n",
    "api/café_routes.py": "ROUTES = {\n    '/menu': 'menu',\n    '/order': 'order',  # HACK: hard-coded until the"
                         " router lands\n}\n\n\ndef route(path):\n    return ROUTES.get(path)\n",
    "core/models.py": "class Order:\n    def __init__(self, items):\n        self.items = items\n\n"
                      "    def total(self):\n        # XXX: floats for money\n        return sum(i.price for"
                      " i in self.items)\n",
    "core/données.py": "RATES = {'EUR': 1.0}\n\n\ndef convert(amount, cur):\n    # TODO: other currencies\n"
                       "    return amount * RATES[cur]\n",
    "jobs/cron.py": "import os\n\n\ndef nightly():\n    os.system('backup')  # FIXME: runs as root\n\n\n"
                    "def weekly():\n    pass\n",
    "jobs/cleanup.py": "import shutil\n\n\ndef clean(tmp):\n    # TODO: keep the last three runs\n"
                       "    shutil.rmtree(tmp)\n",
}


# The write fleet's demo: a small package with its tests, and three markers to clear.
DEMO_REPO = {
    "shop/__init__.py": "",
    "shop/cart.py": "def count(items):\n    # FIXME: say what an empty cart counts as\n    return len(items)\n",
    "shop/prices.py": "def total(prices):\n    # TODO: round to cents\n    return round(sum(prices), 2)\n",
    "shop/tax.py": "RATE = 0.25\n\n\ndef with_tax(amount):\n    # XXX: one rate for every country\n"
                   "    return amount * (1 + RATE)\n",
    "tests/__init__.py": "",
    "tests/test_shop.py": "import unittest\n\nfrom shop import cart, prices, tax\n\n\nclass Shop(unittest.TestCase):\n"
                          "    def test_count(self):\n        self.assertEqual(cart.count(['a', 'b']), 2)\n\n"
                          "    def test_total(self):\n        self.assertEqual(prices.total([1.25, 2]), 3.25)\n\n"
                          "    def test_tax(self):\n        self.assertEqual(tax.with_tax(8), 10)\n",
}


def demo_steps(a, workdir):
    """The demo's commands, as the lead runs them: the audit, or (--worktrees) the write fleet."""
    import shlex
    honest = liar = a.agent
    if a.agent == "sim":
        honest = "sim --delay 0.3 --seed %s" % shlex.quote(a.seed)
        liar = "sim --lie %d --verifier rubber-stamp --delay 0.3 --seed %s" % (1 if a.worktrees else 2,
                                                                               shlex.quote(a.seed))
    start = [["spawn", "demo", 3, workdir, "--agent", honest, "--force"] + ["--worktrees"] * a.worktrees,
             ["add", "demo", 1, "--agent", liar]]
    wait = ["wait", "demo", "--timeout", 180, "--interval", 0.3, "--stall", 60, "--nudge"]
    if not a.worktrees:
        return start + [
            ["brief", "demo", n, "--role", "finder", "--send", "--goal", "the files under `%s/` carry TODO, FIXME, "
             "HACK or XXX markers" % part, "--constraint", "Look only at the files under `%s/`." % part]
            for n, part in enumerate(("api", "core", "jobs", "jobs"), 1)] + [
            wait, ["verify", "demo", "--verdicts", 2, "--timeout", 180], ["report", "demo"]]
    check = ["--check", "%s -m unittest -q" % shlex.quote(sys.executable)]
    return start + [
        ["brief", "demo", n, "--role", "fixer", "--send", "--scope", part, "--goal", "the marker comments "
         "(TODO, FIXME, XXX) in `%s` are stale and can go, keeping the tests green" % part]
        for n, part in enumerate(("shop/cart.py", "shop/prices.py", "shop/tax.py", "shop"), 1)] + [
        wait, ["verify", "demo", "--verdicts", 2, "--timeout", 180] + check, ["merge", "demo"] + check,
        ["report", "demo"], ["kill", "demo"], ["clean", "demo"], ["clean", "demo", "--force"]]   # a throwaway repo


def demo_repo(workdir):
    """The write demo's repository: DEMO_REPO, committed (as orch where git knows nobody)."""
    for rel, text in DEMO_REPO.items():
        os.makedirs(os.path.join(workdir, os.path.dirname(rel)), exist_ok=True)
        write_file(os.path.join(workdir, rel), text)
    write_file(os.path.join(workdir, ".gitignore"), "__pycache__/\n")
    git(workdir, "init", "-q")
    git(workdir, "add", "-A")
    git(workdir, "commit", "-q", "-m", "The shop, before the fleet", env=identity(workdir))


def cmd_demo(a):
    """The whole idea in one command: 4 workers audit, verify each other,
    report; with sim, W4 lies as a finder and as a verifier. Each step is the
    real command, run as the lead runs it; the live stream is the fleet's event log."""
    import signal
    import subprocess
    import tempfile
    workdir = os.path.abspath(a.workdir or tempfile.mkdtemp(prefix="orch-demo-"))
    os.makedirs(workdir, exist_ok=True)
    if not os.listdir(workdir):
        if a.worktrees:
            demo_repo(workdir)
        for rel, text in DEMO_FILES.items() if not a.worktrees else ():
            os.makedirs(os.path.join(workdir, os.path.dirname(rel)), exist_ok=True)
            write_file(os.path.join(workdir, rel), text)
    if session_of("demo") in live_sessions():
        raise OrchError("fleet 'demo' is live: `orch kill demo` first")
    isolated, why = isolation()
    print("orch demo: 4 %s workers %s%s; %s" % (
        a.agent, "each fix %s in a git worktree of its own, then verify each other's changes" % workdir
        if a.worktrees else "audit %s for TODO/FIXME/HACK/XXX markers" % workdir,
        ("; W4 lies as a fixer (--lie 1: it breaks a function and says the tests pass)" if a.worktrees else
         "; W4 lies as a finder (--lie 2)") + " and as a verifier (rubber-stamp)" if a.agent == "sim" else "",
        "each isolated by %s: it writes only its own folder%s" % (why, " and worktree" * a.worktrees) if isolated
        else "NOT isolated (%s)" % why), flush=True)
    events = os.path.join(orch_home(create=True), "runs", "demo", "events.jsonl")
    last_run = os.stat(events).st_ino if os.path.exists(events) else None   # --force archives it
    steps = demo_steps(a, workdir)
    t0, offset, running = time.time(), 0, []

    def run(argv):
        """One step, its own process, while the stream goes on: its warnings are
        shown, its error raises (with what it said it did)."""
        nonlocal offset
        out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()     # a pipe could fill and block it
        step = subprocess.Popen(own_argv() + [str(x) for x in argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err)
        running[:] = [step]
        while True:
            done = step.poll() is not None
            if os.path.exists(events) and os.stat(events).st_ino != last_run:
                lines, offset, _ = read_lines(events, offset)
                for e in map(json.loads, lines or []):
                    detail = " ".join("%s=%s" % kv for kv in e.items() if kv[0] not in ("t", "event"))
                    print("%6.1fs  %-8s %s" % (time.time() - t0, e["event"], detail), flush=True)
            if done:
                break
            time.sleep(0.05)
        said = []
        for f in (out, err):
            f.seek(0)
            said.append(f.read().decode("utf-8", "replace").splitlines())
        error = said[1].pop() if step.returncode and said[1] and argv[0] != "wait" else None
        sys.stderr.write("".join(line + "\n" for line in said[1]))
        if argv[0] in ("merge", "clean") and not step.returncode:      # what became of each change
            print("".join("        %s\n" % line for line in said[0]), end="", flush=True)
        if argv[0] == "wait" and step.returncode in (3, 4):
            raise OrchError("demo: the finders did not finish (%s): `orch status demo`"
                            % ("timeout" if step.returncode == 3 else "a worker exited"))
        if step.returncode:
            raise OrchError((error or "`orch %s` exit %d" % (argv[0], step.returncode)).replace("orch: ", "", 1),
                            step.returncode, said=said[0])
    try:
        for argv in steps:
            run(argv)
    finally:                                # an interrupt: the step in progress ends first
        for step in running:
            if step.poll() is None:
                step.send_signal(signal.SIGINT)
                step.wait()
        if session_of("demo") in live_sessions():
            run(["kill", "demo"])
    shared = os.path.join(os.path.dirname(events), "shared")
    print()
    print(read_text(os.path.join(shared, "matrix.md")))
    print("report: %s" % os.path.join(shared, "report.md"))
    if a.worktrees:
        print("merged: `git -C %s log --stat orch/demo/merged` shows the branch the lead would hand on" % workdir)


def cmd_doctor(a):
    """One line per check, with the fix; exit 1 if something required is
    missing. The default agent, where none was chosen and it is not installed,
    is a note: the two first commands (demo, tests) need no agent."""
    agent = a.agent or os.environ.get("ORCH_AGENT") or "claude"
    notes = []
    checks = [("python", sys.version_info >= (3, 8), sys.version.split()[0], "use Python 3.8 or newer")]
    try:
        version = tmux("-V").strip()
    except OrchError:
        version = ""
    m = re.search(r"(\d+)\.(\d+)", version)          # "tmux 3.3a", "tmux next-3.4"
    checks.append(("tmux", bool(version) and (not m or (int(m.group(1)), int(m.group(2))) >= (3, 0)),
                   version or "not found", "install tmux 3.0 or newer (apt-get install tmux, "
                   "brew install tmux)"))
    try:
        entry = AGENTS[profile_of(agent)]
        word, found = agent_binary(agent)
        if "command" not in entry and not found and not (a.agent or os.environ.get("ORCH_AGENT")):
            notes.append(("agent", "%s not found: %s to run a fleet of it; `python3 orch.py demo` and the tests need none "
                                   "(they run the built-in sim)" % (word, entry.get("install", "install %s" % word))))
            entry = {}
        elif "command" not in entry:
            checks.append(("agent", bool(found), "%s at %s" % (word, found) if found else "%s not found" % word,
                           entry.get("install", "install %s" % word) + ", or use --agent sim for a dry run"))
    except OrchError as e:              # the checks go on: doctor is what finds what is wrong
        entry = {}
        checks.append(("agent", False, str(e), "pass --agent NAME (or set ORCH_AGENT)"))
    if "credentials" in entry:
        creds = entry["credentials"]()
        checks.append(("credentials", bool(creds), creds or "none found", entry["login"]))
    try:
        home = orch_home(create=True)
        probe = os.path.join(home, ".doctor-%d" % os.getpid())
        write_file(probe, "")
        os.remove(probe)
        mode = os.stat(home).st_mode & 0o777
        checks.append(("ORCH_HOME", mode == 0o700, "%s (mode %o)" % (home, mode), "chmod 700 %s" % home))
    except (OrchError, OSError) as e:
        checks.append(("ORCH_HOME", False, str(e), "set ORCH_HOME to a writable directory"))
    for what, ok, detail, fix in checks:
        print("%-4s %-12s %s%s" % ("ok" if ok else "FAIL", what, detail, "" if ok else "  -> " + fix))
    for what, detail in notes:
        print("%-4s %-12s %s" % ("note", what, detail))
    isolated, why = isolation()
    print("%-4s %-12s %s" % ("ok" if isolated else "warn", "isolation", "workers run sandboxed (%s): each writes "
                             "only its own folder" % why if isolated else "workers are NOT isolated: any worker can "
                             "write every file of its fleet and a verdict rewritten before orch reads it goes unseen: "
                             + why))
    skill = os.path.join(skill_dir(), "SKILL.md")
    print("%-4s %-12s %s" % ("ok" if os.path.exists(skill) else "note", "skill", skill + (
        "" if os.path.exists(skill) else " missing: `python3 orch.py install` puts it where Claude Code reads it")))
    print("\nClaude Code checks a Monitor call's command against the Bash rules: these cover `wait` under Monitor.")
    print("allow rules for the lead's .claude/settings.json (permissions.allow):")
    for rule in allow_rules():
        print("  %s" % json.dumps(rule))
    return 0 if all(c[1] for c in checks) else 1


def allow_rules():
    """What the lead's Claude Code needs to run the playbook with no prompt: orch
    as it is called (prefix rules match the literal command), and reading the
    fleets' files (briefs, matrix), which lie outside the project."""
    me = "orch" if os.path.basename(ORCH) == "orch" else "python3 %s" % ORCH
    runs = os.path.join(orch_home(), "runs")
    # Claude Code 2.1.331 checks a Monitor call's command against the Bash rules: these
    # also let SKILL.md's `wait --json` run under Monitor with no prompt.
    return sorted({"Bash(%s:*)" % me, "Bash(python3 orch.py:*)", "Bash(orch:*)",     # and as the skill says
                   "Bash(python3 %s:*)" % os.path.join(skill_dir(), "orch.py")}) + ["Read(/%s/**)" % runs]


def install_copy(src, dest, mode):
    """Copy src to dest (an installed copy may be installing itself) with `mode`."""
    import shutil
    if not (os.path.exists(dest) and os.path.samefile(src, dest)):
        shutil.copyfile(src, dest)
    os.chmod(dest, mode)
    return "installed %s" % dest


def cmd_install(a):
    bin_dir = os.path.abspath(os.path.expanduser(a.bin_dir or "~/.local/bin"))
    os.makedirs(bin_dir, exist_ok=True)
    target = os.path.join(bin_dir, "orch")
    print(install_copy(ORCH, target, 0o755))
    skill = os.path.join(os.path.dirname(ORCH), "SKILL.md")
    if os.path.exists(skill):           # with the orch.py it names: ${CLAUDE_SKILL_DIR}/orch.py
        os.makedirs(skill_dir(), exist_ok=True)
        for src, name in ((skill, "SKILL.md"), (ORCH, "orch.py")):
            print(install_copy(src, os.path.join(skill_dir(), name), 0o644))
    on_path = bin_dir in os.environ.get("PATH", "").split(os.pathsep)
    print("%s is %s" % (bin_dir, "on PATH: run `orch doctor`" if on_path else
                        "not on PATH: add it (export PATH=\"%s:$PATH\") or run %s" % (bin_dir, target)))


def cmd_worker(a):
    """The pane command: set the worker's environment, then exec the agent.
    A pane inherits the tmux server's environment, not the lead's: the lead's
    comes from env.json, where add and respawn saved it."""
    import shlex
    home = os.environ["ORCH_HOME"] = a.home or orch_home()
    fleet = load_fleet(a.name)
    w = pick_workers(fleet, a.n, allow_all=False)[0]
    os.environ.update({k: v for k, v in read_state(os.path.join(fleet["run"], "env.json")).items()  # for the
                       if isinstance(v, str) and k and "=" not in k and "\0" not in k + v})    # agent and its setup
    os.environ.update(ORCH_FLEET=fleet["name"], ORCH_WORKER=str(w["n"]), ORCH_SHARED=shared_dir(fleet),
                      ORCH_HOME=home, ORCH_OUT=worker_dir(fleet, w["n"]))
    entry = AGENTS[w["profile"]]
    argv = shlex.split(w["agent"])
    argv[:1] = own_argv() + entry["command"] if "command" in entry else argv[:1]
    extra = entry.get("setup", lambda fleet, w: {})(fleet, w)
    env = {k: v for k, v in dict(os.environ, **extra.get("env", {})).items() if v is not None}
    argv += extra.get("args", [])
    if fleet.get("git"):                # it commits with no prompt, in its own name where git has none
        env.update(identity(fleet["git"]["repo"]), GIT_CONFIG_COUNT="2", GIT_CONFIG_KEY_0="commit.gpgSign",
                   GIT_CONFIG_VALUE_0="false", GIT_CONFIG_KEY_1="gc.auto", GIT_CONFIG_VALUE_1="0")
        for k in [k for k in env if k.startswith("GIT_") and k not in ORCH_IDENTITY and "CONFIG" not in k]:
            del env[k]                  # the lead's GIT_DIR must not send it to the lead's repository
    os.chdir(workdir_of(fleet, w["n"]))
    if fleet.get("isolate"):
        argv = sandboxed(fleet, w, argv, env)
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        raise OrchError("cannot start %s: %s" % (argv[0], e.strerror))


def cmd_hook(a):
    """Claude Code's hooks and status line, run in a worker's environment
    (record_hook). Never an error the agent would act on: exit 0 always."""
    with contextlib.suppress(Exception):
        data = json.loads(sys.stdin.read())     # a Write's whole content: no cap, or the JSON breaks
        fleet, n = load_fleet(os.environ["ORCH_FLEET"]), int(os.environ["ORCH_WORKER"])
        if inside_worker(fleet) != n:           # only for the worker whose pane it runs in
            refuse(fleet, inside_worker(fleet), "hook as W%d" % n)
        said = record_hook(fleet, n, data)
        if said:
            print(said)
    return 0


# --- sim: the built-in simulated agent -----------------------------------------
# It reads the files and decides with code of its own, never with orch's checks,
# so the demo's figures measure orch's verification against a second opinion.

MARKER_PATTERN = r"\b(TODO|FIXME|HACK|XXX)\b"

FABRICATED = ["remove the hardcoded admin password", "this leaks the session token",
              "race condition when two requests arrive", "unchecked SQL string concatenation"]


def sim_lines(workdir, rel):
    """The lines of a file under the workdir as the sim reads it; none for
    anything else (outside the workdir, not a regular file)."""
    root = os.path.realpath(workdir)
    path = os.path.realpath(os.path.join(root, rel))
    text = read_untrusted(path)[0] if os.path.commonpath([root, path]) == root else None
    return (text or "").splitlines()


def sim_find(workdir, n, count, scope, lies, rng):
    """Markers in this worker's share of the files (those under `scope`, else
    every count-th file), then `lies` planted false findings of three kinds."""
    files = []
    for root, dirs, names in os.walk(workdir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += sorted(os.path.relpath(os.path.join(root, f), workdir)
                        for f in names if not f.startswith("."))
    markers, plain = [], []
    for idx, rel in enumerate(files):
        mine = rel.startswith(scope.rstrip("/") + "/") if scope else idx % count == n - 1
        for i, line in enumerate(sim_lines(workdir, rel), 1):
            m = re.search(MARKER_PATTERN, line)
            if m:
                claim = "%s marker: %s" % (m.group(1), line[m.end():].strip(" :-#/*") or "(no text)")
                markers.append((mine, rel, i, claim, line.strip()))
            elif line.strip():
                plain.append((rel, i, line.strip()))
    found = [m[1:] for m in markers if m[0]]
    for j in range(lies):
        kind = "phantom" if j % 2 == 0 else rng.choice(("wrong-line", "fabricated"))
        if kind != "phantom" and markers:
            _, rel, i, claim, quote = rng.choice(markers)
            size = len(sim_lines(workdir, rel))
            if kind == "wrong-line" and size >= 5:
                i = i + 3 if i + 3 <= size else i - 3      # quote 3 lines away from its cite
            else:
                word = re.search(MARKER_PATTERN, quote).group(1)
                claim, quote = "%s marker: %s" % (word, rng.choice(FABRICATED)), \
                    "# %s: %s" % (word, rng.choice(FABRICATED))
        elif plain:                                 # a marker that is not there
            rel, i, quote = rng.choice(plain)
            claim = "%s marker: %s" % (rng.choice(("TODO", "FIXME", "HACK")), " ".join(quote.split()[:5]))
        else:
            continue
        found.insert(rng.randrange(len(found) + 1), (rel, i, claim, quote))
    return ["F%d | %s:%d | %s | %s" % ((k,) + f) for k, f in enumerate(found, 1)]


def sim_quoted(lines, line, end, parts):
    """Whether the quote of a finding (its last cells: a claim may hold a '|'
    too) lies on or within two lines of what it cites, as the sim reads it."""
    near = norm(" ".join(lines[max(0, line - 3):end + 2]))
    for i in range(1, len(parts)):
        quote = "|".join(parts[i:]).strip().strip("`").strip()
        if len(quote) > 1 and quote[0] == quote[-1] and quote[0] in "\"'":
            quote = quote[1:-1]
        if norm(quote) in near:
            return True
    return len(parts) < 2                   # no quote: nothing to disagree with


def sim_verify(workdir, section, kind):
    """Verdicts on the findings of a brief's section as a verifier of
    personality `kind` gives them: honest reads the cited lines itself;
    rubber-stamp confirms everything, quoting what it did not read;
    stamp-real confirms everything, quoting the real cited line;
    contrarian refutes everything with invented quotes, contrarian-real
    with the real line; lazy cannot settle anything; silent writes no
    verdict at all."""
    out = []
    for fid, rest in re.findall(r"^\s*(W\d+\.F\d+) \|(.*)$", section, re.M) if kind != "silent" else []:
        parts = rest.split("|")
        at = re.match(r"(.+):(\d+)(?:-(\d+))?$", parts[0].strip())
        claim = parts[1].strip() if len(parts) > 1 else ""
        word = re.match(r"(TODO|FIXME|HACK|XXX)\b", claim)
        if kind == "lazy" or not at or not word:
            out.append("%s | UNVERIFIABLE | - | the claim names no marker at a place I can read" % fid)
            continue
        path, line, end = at.group(1), int(at.group(2)), int(at.group(3) or at.group(2))
        lines, where = sim_lines(workdir, path), "%s:%d" % (path, line)
        cited = lines[line - 1:end] or [""]
        if kind == "rubber-stamp":
            out.append("%s | CONFIRMED | %s | looks right to me | %s, as the finder says" % (fid, where, claim))
            continue
        if kind == "stamp-real":            # it reads the line, and confirms whatever the claim
            out.append("%s | CONFIRMED | %s | the line is there | %s" % (fid, where, norm(cited[0])))
            continue
        if kind == "contrarian":
            out.append("%s | REFUTED | %s | the line says something else | nothing to see here" % (fid, where))
            continue
        has = any(re.search(r"\b%s\b" % word.group(1), c) for c in cited)
        quoted = line >= 1 and sim_quoted(lines, line, end, parts[1:])
        verdict = "CONFIRMED" if has and quoted and kind == "honest" else "REFUTED"
        why = "the marker is there" if has and quoted else (
            "no %s marker on the cited line" % word.group(1) if not has else "the quote is not on it")
        out.append("%s | %s | %s | %s | %s" % (fid, verdict, where, why if kind == "honest" else
                                               "not a real problem", norm(cited[0])))
    return out


def sim_fix(workdir, scope, lie):
    """A fixer's work: remove the marker comments in its scope, and with
    `lie` also break the first `return` it finds (then claim the tests pass);
    commit it. Returns the result file's lines."""
    import subprocess
    changed, broke = [], None
    for root, dirs, names in os.walk(workdir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            rel = os.path.relpath(os.path.join(root, name), workdir)
            if scope and not any(in_scope(rel, x) for x in scope):
                continue
            lines = sim_lines(workdir, rel)
            kept = [x for x in lines if not re.match(r"\s*#.*%s" % MARKER_PATTERN, x)]
            if lie and broke is None and rel.endswith(".py"):
                i = next((i for i, x in enumerate(kept) if re.match(r"\s*return \S", x)), None)
                if i is not None:
                    kept[i], broke = re.sub(r"return .*", "return None", kept[i]), rel
            if kept != lines:
                write_file(os.path.join(workdir, rel), "".join(x + "\n" for x in kept))
                changed.append(rel)
    if not changed:
        return ["Nothing to change: no marker comment in my scope."]
    summary = "Removed the stale marker comments in %s" % ", ".join(changed)
    said = []
    for argv in (["git", "add", "-A", "--", "."], ["git", "commit", "-q", "-m", summary]):
        p = subprocess.run(argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        said += ["`%s` failed: %s" % (" ".join(argv[:2]), one_line(p.stdout.decode("utf-8", "replace"), 300))] * bool(
            p.returncode)
    how = "I ran the tests and they all pass." if lie else "I ran nothing: the sim only removes comment lines."
    return [summary + ".", "", "Changed: " + ", ".join(changed), "Checked: " + how] + said


def sim_change_verdict(line, kind):
    """A verdict on a change line `W<n>.C | commit .. | diff <path> | ...`: the
    sim reads the diff; honest confirms one that only removes marker comments,
    citing a line the change keeps, and refutes one that adds or removes code,
    citing that line."""
    fid = line.split(" |", 1)[0].strip()
    diff = re.search(r"\| diff (.+?) \| worktree", line)
    text = (read_untrusted(diff.group(1))[0] or "") if diff else ""
    kept, bad, path, at, cuts = None, None, None, 0, False
    for row in text.splitlines():
        if row.startswith("+++ "):
            path = row[6:] if row.startswith("+++ b/") else None
        elif row.startswith("@@"):
            at = int(re.match(r"@@ -\S+ \+(\d+)", row).group(1))
        elif path and row[:1] in (" ", "+", "-") and not row.startswith(("---", "+++")):
            code = row[1:]
            if row[0] == " ":
                kept = kept or (path, at, code) if len(code.strip()) >= 8 else kept   # a line worth quoting
            elif row[0] == "+":                 # a line it adds: it is in the change's tree
                bad = bad or (path, at, code)
            elif not re.match(r"\s*#.*%s" % MARKER_PATTERN, code):
                cuts = True                     # code it removes: not there any more to quote
            at += row[0] != "-"
    if kind == "lazy" or not (kept or bad):
        return "%s | UNVERIFIABLE | - | I could not read that change" % fid
    if kind == "rubber-stamp":
        return "%s | CONFIRMED | %s:1 | looks right to me | the change does what it says" % (fid, (kept or bad)[0])
    if kind in ("contrarian", "contrarian-real"):
        return "%s | REFUTED | %s:%d | not needed | %s" % ((fid,) + (kept or bad)[:2] + (
            "this breaks everything" if kind == "contrarian" else norm((kept or bad)[2]),))
    if (bad or cuts) and kind == "honest":
        bad = bad or kept
        return "%s | REFUTED | %s:%d | it changes code, not only marker comments | %s" % ((fid,) + bad[:2] + (norm(bad[2]),))
    return "%s | CONFIRMED | %s:%d | it only removes marker comments | %s" % ((fid,) + (kept or bad)[:2] + (
        norm((kept or bad)[2]),))


def sim_job(brief_path, key, lie, seed, kind):
    """Do what a brief asks, mechanically; return lines for the screen."""
    import random
    text = read_text(brief_path, "")
    head = re.search(r"^# Worker (\d+) of (\d+) .*\((\w+)\)\s*$", text, re.M)
    paths = {}
    for what, path in re.findall(r"^- (Workdir|Result file|Done flag|Bus|Outbox): `([^`]+)`$", text, re.M):
        paths.setdefault(what, path)             # orch's header comes first; a goal cannot override it
    if not head or len(paths) < 5:
        return ["sim: %s is not a brief I understand" % brief_path]
    n, count, role = int(head.group(1)), int(head.group(2)), head.group(3).lower()

    def say(msg):
        append_line(paths["Outbox"], msg)
    say("starting %s: %s" % (role, os.path.basename(brief_path)))
    if role == "verifier":
        section = text.split("## Findings to check", 1)[-1].split("\n## ", 1)[0]
        result = sim_verify(paths["Workdir"], section, kind) + [
            sim_change_verdict(x.strip(), kind) for x in section.splitlines() if re.match(r"\s*W\d+\.C \|", x)]
        summary = "%d verdicts" % len(result)
    elif role == "finder":
        # "files under `api/`", "files under api/." : with or without backticks and slash
        scope = re.search(r"files under `?([^`\s]+?)/?`?(?:[.,;:]?\s|[.,;:]?$)", text, re.M)
        result = sim_find(paths["Workdir"], n, count, scope and scope.group(1), lie,
                          random.Random("%s-%d" % (seed, n)))
        summary = "%d findings" % len(result)
    elif role == "fixer":
        scope = re.search(r"^- Change only files under (.*) \(relative to the workdir\)", text, re.M)
        result = sim_fix(paths["Workdir"], re.findall(r"`([^`]+)`", scope.group(1)) if scope else [], lie)
        summary = "a fix"
    else:
        result = ["The sim agent does not simulate the %s role; it changed nothing." % role]
        summary = "nothing to do"
    write_file(paths["Result file"], "%s# Result of worker %d\n\n%s\n" % (
        "orch-key: %s\n" % key if key else "", n, "\n".join(result)))
    say("done: %s in %s" % (summary, paths["Result file"]))
    os.close(os.open(paths["Done flag"], os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))  # last
    return ["sim: %s written, done flag touched" % summary]


def cmd_sim(a):
    """A TUI that behaves like the real agents where delivery is concerned:
    bracketed paste, an input box that holds text until Enter, an Enter that
    arrives in the same burst as typed text taken as a newline."""
    import codecs
    import select
    import shutil
    import termios
    import tty
    fd, out = sys.stdin.fileno(), sys.stdout
    n, run = os.environ.get("ORCH_WORKER", "?"), None
    if os.environ.get("ORCH_FLEET") and os.environ.get("ORCH_HOME"):   # its own state dir: writable in its sandbox
        run = os.path.join(os.environ["ORCH_HOME"], "runs", os.environ["ORCH_FLEET"], "workers", "w" + n)
    st = {"draft": "", "paste": False, "pending": "", "jobs": [], "until": 0.0, "ctrl_c": 0,
          "lines": ["sim agent - worker %s - %s" % (n, "ready")]}
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)        # keep what was typed before we were ready
    if not a.no_bracketed_paste:
        out.write("\x1b[?2004h")

    def log(kind, data):
        if run:
            append_line(os.path.join(run, "sim.%s" % kind), data)

    def render():
        cols, rows = shutil.get_terminal_size((80, 24))
        first, *rest = st["draft"].split("\n")
        box = ("sim> " + first + (" [+%d lines]" % len(rest) if rest else ""))[:cols - 1]
        busy = ["sim: working on %s" % os.path.basename(st["jobs"][0][0])] if st["jobs"] else []
        body = [ln[:cols - 1] for ln in st["lines"]][-(rows - 2 - len(busy)):]
        out.write("\x1b[H\x1b[2J" + "\r\n".join(body + busy + ["-" * min(cols - 1, 40), box]))
        out.flush()

    def submit():
        msg = st["draft"].strip()
        st["draft"] = ""
        if not msg:
            return
        log("msgs", json.dumps(msg, ensure_ascii=False))
        first = msg.split("\n")[0]
        st["lines"] += ["> " + first[:200], "  (received %d line(s), %d chars)" % (msg.count("\n") + 1, len(msg))]
        brief = re.search(r"`(/[^`]+\.task\.md)`|(/\S+\.task\.md)", msg)
        if brief:
            if not st["jobs"]:
                st["until"] = time.time() + a.delay
            key = re.search(r"orch-key: (\w+)", msg)
            st["jobs"].append((brief.group(1) or brief.group(2), key and key.group(1)))
        else:
            st["lines"].append("sim: noted")

    def feed(text):
        typed = False
        s = st["pending"] + text
        st["pending"] = ""
        while s:
            if st["paste"]:
                end = s.find("\x1b[201~")
                if end < 0:
                    keep = next((k for k in range(5, 0, -1) if "\x1b[201~".startswith(s[-k:])), 0)
                    st["draft"] += s[:len(s) - keep].replace("\r", "\n")
                    st["pending"] = s[len(s) - keep:]
                    return
                st["draft"] += s[:end].replace("\r", "\n")
                st["paste"], s = False, s[end + 6:]
            elif s.startswith("\x1b[200~"):
                st["paste"], s = True, s[6:]
            elif s[0] == "\x1b":
                m = re.match(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1bO.|\x1b", s)
                if m.group(0) == "\x1b" and len(s) < 6 and "\x1b[200~".startswith(s):
                    st["pending"] = s                   # a sequence split across reads
                    return
                s = s[len(m.group(0)):]
            else:
                ch, s = s[0], s[1:]
                if ch in "\r\n":
                    # Same burst as typed text: a paste of keystrokes, so a newline.
                    if typed:
                        st["draft"] += "\n"
                    else:
                        submit()
                elif ch == "\x15":
                    st["draft"] = ""
                elif ch == "\x03":
                    st["ctrl_c"] = 0 if st["draft"] else st["ctrl_c"] + 1
                    st["draft"] = ""
                    if st["ctrl_c"] >= 2:
                        raise SystemExit(0)
                elif ch in "\x7f\x08":
                    st["draft"] = st["draft"][:-1]
                elif ch == "\t" or ch >= " ":
                    st["draft"] += ch
                    typed = True

    decode = codecs.getincrementaldecoder("utf-8")("replace").decode
    try:
        while True:
            render()
            wait = max(0.0, st["until"] - time.time()) if st["jobs"] else None
            if st["pending"] == "\x1b":       # Esc alone, not a sequence's start: interrupt
                wait = 0.05
            if select.select([fd], [], [], wait)[0]:
                data = os.read(fd, 65536)
                if not data:
                    return 0
                text = decode(data)
                log("in", json.dumps(text, ensure_ascii=False))
                feed(text)
            elif st["pending"] == "\x1b":
                st["pending"], st["jobs"] = "", []
                st["lines"].append("sim: interrupted")
            if st["jobs"] and time.time() >= st["until"]:
                st["lines"] += sim_job(*st["jobs"].pop(0), lie=a.lie, seed=a.seed, kind=a.verifier)
                st["until"] = time.time() + a.delay
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# --- main ----------------------------------------------------------------------

def number(kind, low=0.0, integer=False):
    def parse(text):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = None
        if value is None or value < low or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError("%s must be a number >= %g, not %r" % (kind, low, text[:20]))
        return value
    return parse


def who_name(text):
    if not re.match(r"[A-Za-z0-9_-]{1,32}\Z", text):
        raise argparse.ArgumentTypeError("--as wants a short name like W2 or lead, not %r" % text)
    return text


def arg(*names, **options):
    """One argument of a command: its names and argparse's keywords."""
    return names, options


SECONDS = number("seconds")
NAME, WORKER = arg("name"), arg("worker", metavar="n")
STALL_ARG = arg("--stall", metavar="S", type=SECONDS, default=STALL,
                help="seconds without a screen change that make a worker stalled (default 120)")
BUDGET = arg("--budget", metavar="USD", type=number("--budget"),
             help="past this known fleet cost, interrupt every busy worker and exit 5")
REFRESH = arg("--refresh-env", action="store_true",
              help="the workers get the lead's environment now (default: the one saved at spawn)")
READY = arg("--timeout", metavar="S", type=SECONDS, default=BOOT_WAIT,
            help="seconds to wait until the new workers are ready (default 60, 0: do not wait)")
JSON = arg("--json", action="store_true", help="one JSON object per line")
CHECK = arg("--check", metavar="CMD", help="a write fleet: the lead's check, run on base and on each change")
CHECK_TIMEOUT = arg("--check-timeout", metavar="S", type=SECONDS, default=600.0,
                    help="seconds one run of --check may take (default 600)")

# Every command, in --help order: its name, what it does, its arguments. The
# parser and the command list of --help are both made from this table.
COMMANDS = [
    ("spawn", "start N workers", [
        NAME, arg("N", type=number("N (workers)", 1, True)), arg("workdir", nargs="?"),
        arg("--agent", metavar="A", help="agent name or command line (default $ORCH_AGENT or claude)"),
        arg("--per-window", metavar="K", type=number("--per-window", 1, True), default=4,
            help="panes per tmux window (default 4)"),
        READY, arg("--force", action="store_true", help="end a live fleet, archive its old run dir"),
        arg("--no-isolate", action="store_true", help="run workers without a sandbox, even where bubblewrap runs"),
        arg("--worktrees", action="store_true", help="a write fleet: each worker in a git worktree of its own")]),
    ("add", "add K workers to a live fleet", [
        NAME, arg("K", nargs="?", type=number("K (workers)", 1, True), default=1),
        arg("--agent", metavar="A", help="agent of the new workers (default: the fleet's)"), READY, REFRESH]),
    ("send", "deliver and submit a message", [
        NAME, arg("worker", metavar="n|all"), arg("message", nargs="*", metavar="MESSAGE"),
        arg("--file", metavar="PATH", help="send this file's text (- in MESSAGE reads stdin)"),
        arg("--interrupt", action="store_true", help="end a busy worker's turn first (default: queue it)")]),
    ("brief", "write agent-<n>.task.md", [
        NAME, WORKER, arg("--goal", metavar="TEXT", required=True, help="what the worker determines"),
        arg("--role", metavar="R", choices=sorted(ROLES), default="finder", help="the role template"),
        arg("--constraint", metavar="TEXT", action="append", default=[], help="a hard constraint (repeatable)"),
        arg("--scope", metavar="PATH", action="append", default=[],
            help="confine it to PATH, relative to the workdir (repeatable)"),
        arg("--send", action="store_true", help="tell the worker to read and follow it")]),
    ("read", "the last lines of worker screens", [
        NAME, arg("worker", metavar="n|all"), arg("lines", nargs="?", type=number("lines", 1, True), default=20)]),
    ("log", "what workers did (Claude hooks): prompts, tools, files", [
        NAME, arg("worker", metavar="n", nargs="?"), JSON]),
    ("status", "every fleet, or one fleet's workers and bus", [
        arg("name", nargs="?"), arg("--json", action="store_true", help="JSON output"), STALL_ARG]),
    ("wait", "poll until done flags", [
        NAME, arg("workers", nargs="*", metavar="n"),
        arg("--timeout", metavar="S", type=SECONDS, default=0, help="give up after S seconds, exit 3 (default: never)"),
        arg("--interval", metavar="S", type=number("--interval", 0.05), default=2.0,
            help="seconds between polls (default 2)"),
        STALL_ARG, arg("--nudge", action="store_true", help="nudge a worker once each time it stalls"), BUDGET, JSON,
        arg("--attention", action="store_true", help="exit 6 at the first event that needs the lead")]),
    ("nudge", "clear the input box, remind a worker of its brief", [
        NAME, WORKER, arg("message", nargs="*", metavar="MESSAGE")]),
    ("bus", "read the message bus, or post one line to it", [
        NAME, arg("message", nargs="*", metavar="post MESSAGE"),
        arg("-n", metavar="N", type=number("-n", 0, True), default=20, help="how many last lines (default 20)"),
        arg("--new", action="store_true", help="only lines this reader has not seen"),
        arg("--follow", action="store_true", help="keep printing new lines until the fleet ends"),
        arg("--as", metavar="WHO", dest="who", type=who_name,
            help="who reads or posts (default lead; in a worker's pane, that worker)")]),
    ("verify", "adversarial verification: checked evidence, majority", [
        NAME, arg("--verdicts", metavar="V", type=number("--verdicts", 1, True),
                  help="counted verdicts each finding needs (default 2)"),
        arg("--by", metavar="v,...", help="the verifier pool, worker numbers v,... (default all)"),
        arg("--timeout", metavar="S", type=SECONDS, default=900.0, help="seconds per round (default 900)"), BUDGET,
        CHECK, CHECK_TIMEOUT]),
    ("report", "write and print report.md", [NAME]),
    ("respawn", "restart a worker, re-send its brief", [
        NAME, WORKER, arg("--timeout", metavar="S", type=SECONDS, default=BOOT_WAIT,
                          help="seconds to wait until it is ready (default 60)"), REFRESH]),
    ("kill", "save scrollback to logs/, end the tmux session", [
        arg("name", nargs="?"), arg("--all", action="store_true", help="every live fleet")]),
    ("merge", "build orch/<name>/merged from the CONFIRMED changes", [
        NAME, arg("workers", nargs="*", metavar="n"), CHECK, CHECK_TIMEOUT,
        arg("--ff", action="store_true", help="then fast-forward the lead's branch, if still at base and clean")]),
    ("clean", "remove worktrees and branches whose change is merged or empty", [
        NAME, arg("--force", action="store_true", help="remove them all (snapshots and diffs stay)")]),
    ("attach", "watch a fleet, read-only", [NAME]),
    ("demo", "a 4-worker self-verifying audit, end to end", [
        arg("workdir", nargs="?"),
        arg("--agent", metavar="A", default="sim", choices=("sim", "claude"),
            help="the workers' agent (default sim)"),
        arg("--seed", metavar="S", default="1", help="the sim's random seed (default 1)"),
        arg("--worktrees", action="store_true", help="a write fleet instead: fixers, checks, a merge")]),
    ("doctor", "check python, tmux, agent, credentials, ORCH_HOME", [
        arg("--agent", metavar="A", help="the agent to check (default $ORCH_AGENT or claude)")]),
    ("install", "copy orch to ~/.local/bin, SKILL.md to ~/.claude", [
        arg("--bin-dir", metavar="D", help="where orch goes (default ~/.local/bin)")]),
    ("worker", "internal: the pane command that starts the agent", [
        NAME, arg("n"), arg("--home", metavar="H", help="the fleet's ORCH_HOME")]),
    ("hook", "internal: Claude Code's hooks and status line", []),
    ("sim", "internal: the built-in simulated agent", [
        arg("--lie", metavar="N", type=number("--lie", 0, True), default=0, help="plant N false findings as a finder"),
        arg("--verifier", metavar="KIND", default="honest", help="how it verifies", choices=(
                "honest", "rubber-stamp", "stamp-real", "contrarian", "contrarian-real", "lazy", "silent")),
        arg("--seed", metavar="S", default="1", help="random seed"),
        arg("--delay", metavar="S", type=SECONDS, default=0.5, help="seconds per job (default 0.5)"),
        arg("--no-bracketed-paste", action="store_true", help="do not ask for bracketed paste")]),
]


def synopsis(names, options):
    """How --help shows one argument: <name>, [workdir], [n...], [--agent A]."""
    word = options.get("metavar") or options.get("dest") or names[0]
    if not names[0].startswith("-"):
        return {"?": "[%s]", "*": "[%s...]"}.get(options.get("nargs"), "<%s>") % word
    shown = names[0] if options.get("action") == "store_true" else "%s %s" % (names[0], word)
    return shown if options.get("required") else "[%s]%s" % (shown, "..." * (options.get("action") == "append"))


def command_list():
    """The commands section of --help, from COMMANDS."""
    out = []
    for name, what, arguments in COMMANDS:
        words = [synopsis(*a) for a in arguments]
        left = [w for w, a in zip(words, arguments) if not a[0][0].startswith("-") or a[1].get("required")]
        line = "  %-32s  %s " % (" ".join([name] + left), what)
        for word in [w for w in words if w not in left]:
            if len(line) + 1 + len(word) > 88:
                out.append(line.rstrip())
                line = " " * 35
            line += " " + word
        out.append(line.rstrip())
    return "\n".join(out)


def build_parser(only=None):
    """The parser of every command, or of the command `only` (a start builds
    only the one it runs)."""

    class Parser(argparse.ArgumentParser):
        def error(self, message):           # usage errors take the one error path
            raise OrchError("%s (see `orch %s--help`)" % (message, self.prog.split(" ", 1)[1] + " "
                            if " " in self.prog else ""), 2)
    doc = __doc__.replace("commands: (written out from COMMANDS, at the end of this file)",
                          "commands:\n" + command_list()) if only is None else None
    p = Parser(prog="orch", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
               usage=argparse.SUPPRESS, add_help=True)
    p.add_argument("--version", action="store_true", help="show the version and the file's digest")
    sub = p.add_subparsers(dest="command", parser_class=Parser, help=argparse.SUPPRESS)
    for name, _, arguments in COMMANDS:
        if only in (None, name):
            sp = sub.add_parser(name, prog="orch " + name)
            for names, options in arguments:
                sp.add_argument(*names, **options)
    return p


def dispatch(argv):
    """Parse one command line: (the cmd_* function to run, its arguments), or
    (None, what to print and the exit code) for --version and a bare `orch`."""
    import hashlib
    known = {name for name, _, _ in COMMANDS}
    parser = build_parser(argv[0] if argv and argv[0] in known else None)
    # argparse fills a '*' positional before the options that follow it
    # (`bus f post --as W2 hi`): the leftover words belong to the message.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "message") or any(x.startswith("-") for x in extra)):
        parser.error("unrecognized arguments: %s" % " ".join(extra))
    args.message = getattr(args, "message", []) + extra
    if args.version:
        with open(ORCH, "rb") as f:     # any vendored copy can be told apart
            return None, ("orch %s (%s)\n" % (VERSION, hashlib.sha256(f.read()).hexdigest()[:12]), 0)
    if not args.command:
        return None, (build_parser().format_help(), 2)
    if getattr(args, "name", None) is not None:
        check_name(args.name)
    return globals()["cmd_" + args.command], args


def main(argv=None):
    os.umask(0o077)                 # every file and directory orch makes is private
    try:
        command, args = dispatch(sys.argv[1:] if argv is None else argv)
        if command is None:
            text, code = args
            sys.stdout.write(text)
            return code
        return command(args) or 0
    except OrchError as e:
        if os.environ.get("ORCH_DEBUG"):
            raise
        for line in e.said:         # what did succeed before the failure
            print(line)
        print("orch: %s" % e, file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `orch status | head -1`: stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:            # a read-only ORCH_HOME, a full disk: one line, no traceback
        if os.environ.get("ORCH_DEBUG"):
            raise
        print("orch: %s%s" % (e.strerror or e, ": %s" % e.filename if e.filename else ""), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
