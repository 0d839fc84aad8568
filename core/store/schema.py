"""Tables of the store (proxy -> store -> learner), SQLAlchemy Core.

``turns`` holds one row per request: the request, the reply, exact token ids and
logprobs, and later its next state. ``sessions`` ties turns together. ``turn_keys``
indexes each reply by the hash of the conversation it completes, so that a request
that extends that conversation finds its session without any header. ``feedback`` holds
explicit scores and hints from users (headers, the feedback endpoint, adapters).

The learner's tables live here too, so that the proxy can route to and report on what
it publishes: ``judgments`` (one per judged turn: score, votes, hints, teacher logprobs,
and the adapter version that learned from it), ``adapters`` (every version the learner
made, and which one is current), ``learner_status`` and ``scores`` (a benchmark's
score of each version, where a run records one).

Images (images.py): ``images`` holds each distinct image a request carried once, by the
sha256 of its bytes; the turns' JSON holds ``nextstate-image:sha256:<hex>`` references in
their place, and ``turn_images`` says which turns reference which image (an image no turn
references any more is deleted with the last of them).

The memory's: ``lessons`` (hints remembered per user, per tenant or shared, which the
proxy serves in later prompts until the weights have learned them) and ``lesson_turns``
(the turns each lesson was learned from, and those it was served in, with their score);
``memory_scopes``: per asker, whether the memory serves lessons or has handed over to
the weights.

A store created by an older nextstate gets the columns added since (all nullable) when
it is opened: `add_missing_columns`.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    text,
)
from sqlalchemy.schema import CreateColumn

metadata = MetaData()

sessions = Table(
    "sessions",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("turn_count", Integer, nullable=False, default=0),
    Column("last_main_turn_id", String(64)),
    Column("done", Boolean, nullable=False, default=False),
    Column("tenant", String(128)),
    # The episode's outcome (feedback given for the whole session, e.g. a test verdict);
    # the trainer adds it to every step's judge score.
    Column("outcome", Integer),
)

turns = Table(
    "turns",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("session_id", String(128), nullable=False),
    Column("turn_index", Integer, nullable=False),
    Column("turn_type", String(8), nullable=False),
    Column("endpoint", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("http_status", Integer),
    Column("error", Text),
    Column("model", String(256)),
    Column("served_model", String(256)),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("latency_ms", Float),
    Column("ttft_ms", Float),
    Column("request", JSON, nullable=False),
    Column("response", JSON),
    Column("prompt_token_ids", JSON),
    Column("completion_token_ids", JSON),
    Column("logprobs", JSON),
    Column("next_state", JSON),
    Column("next_state_kind", String(8)),
    # pending: waiting for the session's next request; paired: has its next state;
    # none: the session ended after it; n/a: never gets one (side turn, error, abort).
    Column("next_state_status", String(8), nullable=False),
    Column("next_state_at", Float),
    Column("next_turn_id", String(64)),
    Column("tenant", String(128)),
    # Whose turn it is (X-NextState-User within the tenant, else the tenant): a user's
    # turns train their personal adapter, when the learner makes personal adapters.
    Column("user", String(300)),
    # Secrets or personal data were scrubbed from this turn; its token ids are dropped.
    Column("redacted", Boolean, nullable=False, default=False),
    # Why this turn's tokens cannot be trained on (see record.untrainable); NULL: they are
    # exactly what vLLM sampled. The learner never trains on a turn that has a reason.
    Column("untrainable", String(200)),
    # A dialect turn's own request and answer (Anthropic Messages, OpenAI Responses), the
    # chat exchange being in request/response; NULL for chat and completions turns.
    Column("dialect", JSON),
    # The lessons the proxy's memory served this turn with, and where they went:
    # {"ids", "hint", "message", "part", "offset", "added"} (core/hints.py); NULL: none.
    # ``request`` is the client's own; ``prompt_token_ids`` what the model saw.
    Column("lessons", JSON),
    Index("ix_turns_session", "session_id", "turn_index"),
    Index("ix_turns_created", "created_at"),
    Index("ix_turns_pending", "next_state_status", "created_at"),
    # The learner looks up, each round, the turns waiting for their sampler logprobs.
    Index("ix_turns_untrainable", "untrainable"),
)

turn_keys = Table(
    "turn_keys",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("turn_id", String(64), primary_key=True),
    Column("choice", Integer, primary_key=True),
    Column("created_at", Float, nullable=False),
)

images = Table(
    "images",
    metadata,
    Column("sha256", String(64), primary_key=True),  # of the decoded bytes, hex
    # As the first request that carried it named it (``data:<media_type>;base64,...``).
    Column("media_type", String(128), nullable=False),
    Column("size", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)

# Which turns reference which images (in their request, dialect or next state).
turn_images = Table(
    "turn_images",
    metadata,
    Column("turn_id", String(64), primary_key=True),
    Column("sha256", String(64), primary_key=True),
    Index("ix_turn_images_sha256", "sha256"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("turn_id", String(64), index=True),
    Column("session_id", String(128)),
    Column("score", Integer, nullable=False),
    Column("hint", Text),
    Column("comment", Text),
    Column("source", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("tenant", String(128)),
)

judgments = Table(
    "judgments",
    metadata,
    Column("turn_id", String(64), primary_key=True),
    Column("status", String(8), nullable=False),  # ok | error
    Column("score", Integer),
    Column("source", String(16)),  # judge | feedback | none (no next state, no feedback)
    Column("votes", JSON),
    Column("texts", JSON),
    Column("hints", JSON),
    Column("judge", String(256)),
    Column("prompt_version", String(64)),
    # One list of teacher logprobs per hint, aligned with the turn's completion tokens.
    Column("teacher_logprobs", JSON),
    Column("teacher_model", String(256)),
    Column("attempts", Integer, nullable=False, default=0),
    Column("error", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # The adapter version that learned from this turn, set when that version is
    # published (-1: skipped, e.g. too stale or refused by the publish gate).
    Column("trained_version", Integer),
    # For a turn served with lessons: its prompt without them, as vLLM tokenizes it (the
    # student's side of context distillation; the recorded prompt is the teacher's).
    Column("student_prompt_ids", JSON),
    Index("ix_judgments_status", "status", "updated_at"),
    Index("ix_judgments_trained", "trained_version"),
)

adapters = Table(
    "adapters",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("name", String(256), nullable=False, unique=True),  # <policy>@<version:06d>
    Column("policy", String(256), nullable=False),
    Column("path", Text, nullable=False),
    # staged -> current -> previous -> unloaded; refused (gate) | failed (load) | abandoned;
    # forgotten: a personal adapter whose user was forgotten (its directory is deleted)
    Column("status", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("published_at", Float),
    Column("retired_at", Float),
    Column("stats", JSON),
    Column("error", Text),
)

# A benchmark's score of one adapter version (``<policy>@base``: the base model before
# any step), recorded by the run that measured it (`nextstate bench learning`); the
# dashboard's learning curves show them beside the training numbers.
scores = Table(
    "scores",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("policy", String(256), nullable=False),
    Column("adapter", String(256), nullable=False),
    Column("benchmark", String(128), nullable=False),
    Column("score", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_scores_policy", "policy", "created_at"),
)

lessons = Table(
    "lessons",
    metadata,
    Column("id", String(32), primary_key=True),
    # Scope: a user's (tenant, user), a tenant's (tenant, NULL), shared (NULL, NULL).
    Column("tenant", String(128)),
    Column("user", String(300)),
    Column("text", Text, nullable=False),
    Column("context", Text),  # what it was learned on: the message the hint corrected
    # active (served) | retired (the weights follow it) | dropped (it kept failing)
    Column("status", String(12), nullable=False),
    Column("status_reason", Text),
    Column("pinned", Boolean, nullable=False, default=False),
    Column("origin", String(16), nullable=False),  # judge | feedback | manual
    Column("support", Integer, nullable=False, default=1),  # hints merged into it
    Column("served", Integer, nullable=False, default=0),  # judged turns served with it
    Column("helped", Integer, nullable=False, default=0),  # ... that scored +1
    Column("failed", Integer, nullable=False, default=0),  # ... that scored -1
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("last_served_at", Float),
    Column("last_useful_at", Float),  # a turn served with it scored +1
    Column("status_at", Float),  # when it was retired or dropped
    # The last retirement check: the adapter it ran on and what it measured.
    Column("checked", JSON),
    Index("ix_lessons_scope", "tenant", "user", "status"),
)

lesson_turns = Table(
    "lesson_turns",
    metadata,
    Column("lesson_id", String(32), primary_key=True),
    Column("turn_id", String(64), primary_key=True),
    Column("role", String(8), primary_key=True),  # source | served
    Column("score", Integer),  # served: the turn's judged score
    Column("at", Float, nullable=False),
    Index("ix_lesson_turns_turn", "turn_id"),
)

# Per asker's scope, whether the memory still serves its lessons or has handed them over
# to the weights, decided by the learner from the judged turns served with and without
# them (learner/handover.py); the proxy reads it with the lessons.
memory_scopes = Table(
    "memory_scopes",
    metadata,
    Column("key", String(460), primary_key=True),  # the scope as JSON: [tenant, user]
    Column("tenant", String(128)),
    Column("user", String(300)),
    Column("mode", String(8), nullable=False),  # lessons | weights
    Column("reason", Text),
    Column("figures", JSON),  # the two arms' judged turns and mean scores
    Column("since", Float, nullable=False),  # when the current mode began
    Column("decided_at", Float, nullable=False),
)

learner_status = Table(
    "learner_status",
    metadata,
    Column("id", Integer, primary_key=True),  # one row per learner (0)
    Column("updated_at", Float, nullable=False),
    Column("status", JSON, nullable=False),
)


def add_missing_columns(engine: Engine) -> list[str]:
    """Add the columns (and indexes) a database created by an older nextstate lacks
    (ALTER TABLE ... ADD COLUMN, the same on SQLite and PostgreSQL). Every column added
    after the first release is nullable, so old rows simply read as NULL. Returns what
    was added."""
    tables = inspect(engine)
    preparer = engine.dialect.identifier_preparer
    added = []
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            have = {c["name"] for c in tables.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                assert column.nullable, f"{table.name}.{column.name} must be nullable"
                ddl = CreateColumn(column).compile(dialect=engine.dialect)
                conn.execute(text(f"ALTER TABLE {preparer.quote(table.name)} ADD COLUMN {ddl}"))
                added.append(f"{table.name}.{column.name}")
            indexed = {i["name"] for i in tables.get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in indexed:
                    index.create(conn)
                    added.append(str(index.name))
    return added
