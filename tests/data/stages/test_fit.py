"""The fitting policies and their invariants.

Images here exist only as headers (sizes): fitting never needs pixels, which is what lets the
property tests run thousands of conversations in seconds.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlmtune.data.stages.collate import check_row, find_runs
from vlmtune.data.stages.encode import IGNORE_INDEX, Encoder, emit, with_budget
from vlmtune.data.stages.fit import FitOptions, Fitter, exchanges_of
from vlmtune.data.media.images import ImageHeader
from vlmtune.data.types import Conversation, ImagePart, Message, Origin, TextPart
from vlmtune.errors import SampleError
from vlmtune.models.load import load_spec

WORDS = "red green blue circle square triangle picture image shows the a which is of and what colour".split()


@pytest.fixture(scope="module")
def env(tiny_ckpt):
    loaded = load_spec(str(tiny_ckpt("qwen2_vl")))
    return loaded, Encoder(loaded.processor, loaded.spec)


def conv_of(turns, sid="s", tools=None):
    """turns: list of (role, [str | (w, h)]) → Conversation with fake image paths. A "function_call" turn's
    text is its call's argument (LLaMA-Factory's {"name", "arguments"})."""
    msgs, headers, k = [], {}, 0
    for role, parts in turns:
        if role == "function_call":
            msgs.append(Message(role, [], tool_calls=[{"name": "lookup", "arguments": {"q": " ".join(parts)}}]))
            continue
        ps = []
        for p in parts:
            if isinstance(p, tuple):
                path = f"/img/{sid}_{k}.png"
                headers[path] = ImageHeader(width=p[0], height=p[1], format="PNG")
                ps.append(ImagePart(ref=path, path=path))
                k += 1
            else:
                ps.append(TextPart(p))
        msgs.append(Message(role, ps))
    return Conversation(sid, f"data.jsonl:{sid}", msgs, origin=ORIGIN, tools=tools), headers


ORIGIN = Origin("data.jsonl", 7)  # where conv_of's samples are, as the reader records it


def roles_of(ids, spec, tokenizer):
    """The role of the turn each token belongs to, from the ChatML markers."""
    roles, role = [], None
    i = 0
    while i < len(ids):
        if ids[i] == spec.im_start_token_id:
            j = i + 1
            while tokenizer.decode(ids[i + 1 : j]).find("\n") < 0:
                j += 1
            role = tokenizer.decode(ids[i + 1 : j]).strip()
            roles += [role] * (j - i)
            i = j
            continue
        roles.append(role)
        i += 1
    return roles


# -- exact behaviour of each policy ----------------------------------------------------------
def test_kept_sample_is_emitted_unchanged(env):
    loaded, enc = env
    conv, headers = conv_of([("user", [(56, 56), "What colour?"]), ("assistant", ["red"])])
    e = enc.encode(conv, headers)
    out = Fitter(loaded.spec, FitOptions(cutoff_len=e.length)).fit(e)
    assert (out.fate, out.tokens_before, out.tokens_after) == ("kept", e.length, e.length)
    assert out.reason == f"fits ({e.length} <= {e.length})"
    assert {k: out.report()[k] for k in ("file", "index", "piece")} == {"file": "data.jsonl", "index": 7, "piece": 0}
    row = emit(out.pieces[0], loaded.spec)
    assert (row.file, row.index, row.piece, row.sample_id) == ("data.jsonl", 7, 0, "s")


def test_shrink_images_finds_largest_budget_that_fits(env):
    loaded, enc = env
    spec = loaded.spec
    conv, headers = conv_of([("user", [(448, 448), (448, 224), "Compare them."]), ("assistant", ["same"])])
    e = enc.encode(conv, headers)
    assert [i.tokens for i in e.images] == [256, 128]
    text = e.text_tokens
    out = Fitter(spec, FitOptions(cutoff_len=text + 200, overflow=("shrink_images",))).fit(e)
    assert out.fate == "shrunk"
    piece = out.pieces[0]
    assert piece.length <= text + 200
    # The largest whole-token budget: one more token step would not fit.
    budget = piece.images[0].max_pixels
    bigger = with_budget(e, spec, budget + spec.factor ** 2)
    assert bigger.length > text + 200
    assert out.reason == (f"shrank 2 image(s) from 384 to {piece.image_tokens} image tokens (pixel budget {budget})")


def test_shrink_never_goes_below_min_image_tokens(env):
    loaded, enc = env
    conv, headers = conv_of([("user", [(448, 448), "Q"]), ("assistant", ["A"])])
    e = enc.encode(conv, headers)
    out = Fitter(loaded.spec, FitOptions(cutoff_len=e.text_tokens + 3, overflow=("shrink_images",),
                                         min_image_tokens=4)).fit(e)
    assert out.fate == "dropped"
    assert out.tokens_after is None
    assert "no overflow policy could fit it (tried: shrink_images)" in out.reason


def test_truncate_drops_oldest_text_exchanges_and_keeps_images(env):
    loaded, enc = env
    long = " ".join(WORDS * 3)
    conv, headers = conv_of([
        ("user", [long]), ("assistant", [long]),
        ("user", [(56, 56), "What is it?"]), ("assistant", ["a circle"]),
        ("user", [long]), ("assistant", ["ok"]),
    ])
    e = enc.encode(conv, headers)
    sys_len = e.blocks[0].length
    _, exchanges = exchanges_of(e)
    need = sys_len + sum(b.length for b in exchanges[1]) + sum(b.length for b in exchanges[2])
    out = Fitter(loaded.spec, FitOptions(cutoff_len=need, overflow=("truncate_text",))).fit(e)
    assert out.fate == "truncated"
    assert out.reason == "dropped 1 oldest text-only exchange(s)"
    assert out.tokens_after == need
    assert len(out.pieces[0].images) == 1


def test_truncate_cuts_tail_of_long_user_text(env):
    loaded, enc = env
    conv, headers = conv_of([("user", [(56, 56), " ".join(WORDS * 4)]), ("assistant", ["yes"])])
    e = enc.encode(conv, headers)
    out = Fitter(loaded.spec, FitOptions(cutoff_len=e.length - 10, overflow=("truncate_text",))).fit(e)
    assert (out.fate, out.tokens_after, out.reason) == ("truncated", e.length - 10, "cut 10 token(s) from the end of user text")
    row = emit(out.pieces[0], loaded.spec)
    assert check_row(row.to_dict(), loaded.spec, e.length - 10) == []


def test_split_gives_each_piece_its_own_images(env):
    loaded, enc = env
    conv, headers = conv_of([
        ("user", [(448, 448), "first?"]), ("assistant", ["one"]),
        ("user", [(448, 448), "second?"]), ("assistant", ["two"]),
        ("user", [(224, 448), "third?"]), ("assistant", ["three"]),
    ])
    e = enc.encode(conv, headers)
    cut = 300
    out = Fitter(loaded.spec, FitOptions(cutoff_len=cut, overflow=("split",))).fit(e)
    assert out.fate == "split"
    assert [p.id for p in out.pieces] == ["s#1", "s#2", "s#3"]  # named by the exchanges they hold
    assert [emit(p, loaded.spec).sample_id for p in out.pieces] == ["s", "s", "s"]  # their sample, as data
    assert emit(e, loaded.spec).sample_id == "s"
    # the origin as data: every piece has its input's file and index, numbered 1..n in order; the whole sample 0
    assert [(r.file, r.index, r.piece) for r in (emit(p, loaded.spec) for p in out.pieces)] == [
        ("data.jsonl", 7, 1), ("data.jsonl", 7, 2), ("data.jsonl", 7, 3)]
    assert (emit(e, loaded.spec).piece, e.piece) == (0, 0)
    report = out.report()
    assert (report["file"], report["index"], report["piece"]) == ("data.jsonl", 7, [1, 2, 3])
    assert len(report["tokens_after"]) == 3
    assert out.reason == "split 3 exchanges into 3 samples at exchange boundaries"
    assert all(n <= cut for n in out.tokens_after)
    for p in out.pieces:
        row = emit(p, loaded.spec).to_dict()
        assert check_row(row, loaded.spec, cut) == []
        # exactly one trained answer per piece: context turns are masked
        assert sum(b.trained for b in p.blocks) == 1


def test_split_reports_what_was_done_to_each_piece(env):
    loaded, enc = env
    long = " ".join(WORDS * 12)
    conv, headers = conv_of([
        ("user", ["a?"]), ("assistant", ["b"]), ("user", ["c?"]), ("assistant", ["d"]),
        ("user", [(448, 448), "what?"]), ("assistant", ["circle"]),
        ("user", [long]), ("assistant", ["ok"]),
    ])
    e = enc.encode(conv, headers)
    _, ex = exchanges_of(e)
    cut = e.blocks[0].length + sum(b.length for b in ex[2]) - 50
    assert e.text_tokens > cut and e.blocks[0].length + sum(b.length for b in ex[3]) <= cut
    out = Fitter(loaded.spec, FitOptions(cutoff_len=cut, overflow=("shrink_images", "split"),
                                         split_keep_context=False)).fit(e)
    assert out.fate == "split"
    assert [p.id for p in out.pieces] == ["s#1-2", "s#3", "s#4"]
    shrunk = out.pieces[1]
    assert out.reason == (
        "split 4 exchanges into 3 samples at exchange boundaries; piece 3: shrank 1 image(s) from 256 to "
        f"{shrunk.image_tokens} image tokens (pixel budget {shrunk.images[0].max_pixels})"
    )


def test_split_keeps_preceding_context_when_it_fits(env):
    loaded, enc = env
    conv, headers = conv_of([
        ("user", ["hi"]), ("assistant", ["hello"]),
        ("user", [(448, 448), "what?"]), ("assistant", ["a red circle"]),
    ])
    e = enc.encode(conv, headers)
    _, ex = exchanges_of(e)
    first = sum(b.length for b in ex[0])
    cut = e.length - 1  # everything but one token: the context of piece 2 cannot come along…
    out = Fitter(loaded.spec, FitOptions(cutoff_len=cut, overflow=("split",))).fit(e)
    assert [len(p.blocks) for p in out.pieces] == [3, 3]
    cut = e.blocks[0].length + sum(b.length for b in ex[1]) + first  # …and here it can
    out = Fitter(loaded.spec, FitOptions(cutoff_len=cut, overflow=("split",))).fit(e)
    assert out.fate == "kept"


def test_error_policy_names_sample_and_smallest_cutoff(env):
    loaded, enc = env
    conv, headers = conv_of([("user", [(448, 448), "Q"]), ("assistant", ["A"])], sid="42")
    e = enc.encode(conv, headers)
    with pytest.raises(SampleError) as err:
        Fitter(loaded.spec, FitOptions(cutoff_len=50, overflow=("error",))).fit(e)
    assert str(err.value) == (
        f"sample 42 (data.jsonl:42): {e.length} tokens exceed cutoff_len=50 and the overflow policies before "
        f"'error' cannot fit it; raise cutoff_len to at least {e.length} or add shrink_images / truncate_text / "
        "split / drop to overflow"
    )


def test_max_image_token_share_leaves_room_for_text(env):
    loaded, enc = env
    conv, headers = conv_of([("user", [(448, 448), (448, 448), "Q"]), ("assistant", ["A"])])
    e = enc.encode(conv, headers)
    out = Fitter(loaded.spec, FitOptions(cutoff_len=1000, max_image_token_share=0.25)).fit(e)
    assert out.fate == "shrunk"
    assert out.pieces[0].image_tokens <= 250
    assert out.reason.endswith("to respect max_image_token_share=0.25 (250 tokens)")


# -- tool exchanges: a call, its results and the answer after them are one unit ---------------
TOOLS = [{"name": "lookup", "description": "looks a word up", "parameters": {"type": "object"}}]


def tool_trip():
    """Three exchanges: one tool round, two tool rounds, none."""
    return conv_of([
        ("user", ["weather in Paris?"]), ("function_call", ["Paris"]), ("observation", ["21 C and " + " ".join(WORDS)]),
        ("assistant", ["It is 21 C."]),
        ("user", ["and Rome, then Oslo?"]), ("function_call", ["Rome"]), ("observation", ["25 C"]),
        ("function_call", ["Oslo"]), ("observation", ["9 C " + " ".join(WORDS)]), ("assistant", ["25 C, then 9 C."]),
        ("user", ["thanks"]), ("assistant", ["You are welcome: " + " ".join(WORDS * 2)]),
    ], tools=TOOLS)


def kinds(blocks):
    """Each block as (message index, tool kind): what a piece holds of the conversation."""
    return [(b.message_index, b.tool) for b in blocks]


def test_exchanges_keep_tool_calls_with_results_and_answer(env):
    loaded, enc = env
    e = enc.encode(*tool_trip())
    system, ex = exchanges_of(e)
    assert [b.role for b in system] == ["system"] and system[0].message_index is None  # the tools' system turn
    assert [kinds(x) for x in ex] == [
        [(0, None), (1, "call"), (2, "result"), (3, None)],
        [(4, None), (5, "call"), (6, "result"), (7, "call"), (8, "result"), (9, None)],
        [(10, None), (11, None)],
    ]
    # as rendered, a call is an assistant turn and a result a user turn: the roles alone would cut after each call
    assert [b.role for b in ex[1]] == ["user", "assistant", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("context", [False, True])
def test_split_cuts_tool_conversations_only_between_exchanges(env, context):
    loaded, enc = env
    e = enc.encode(*tool_trip())
    system, ex = exchanges_of(e)
    sys_len, lengths = system[0].length, [sum(b.length for b in x) for x in ex]
    cut = sys_len + lengths[1]  # the longest exchange: each fits alone, no two together
    assert lengths == [142, 235, 57] and sys_len == 268
    # the turn before each tool result would have fitted with the exchange before it: only the grouping stops it
    assert sys_len + lengths[0] + ex[1][0].length + ex[1][1].length <= cut
    out = Fitter(loaded.spec, FitOptions(cutoff_len=cut, overflow=("split",), split_keep_context=context)).fit(e)
    assert out.fate == "split"
    assert [p.id for p in out.pieces] == ["s#1", "s#2", "s#3"]
    assert out.reason == ("split 3 exchanges into 3 samples at exchange boundaries "
                          "(never inside tool exchange(s) [1, 2]: a call stays with its results and answer)")
    assert out.tokens_after == [sys_len + n for n in lengths]  # no earlier exchange fits as context either
    assert [kinds(p.blocks[1:]) for p in out.pieces] == [kinds(x) for x in ex]
    for p in out.pieces:
        assert p.blocks[0].ids == system[0].ids  # every piece carries the tool definitions
        assert p.blocks[1].tool is None and p.blocks[1].role == "user"  # never starts at a tool result
        row = emit(p, loaded.spec).to_dict()
        assert check_row(row, loaded.spec, cut) == []
    # calls and answers trained, results context
    assert [[b.trained for b in p.blocks[1:]] for p in out.pieces] == [
        [False, True, False, True], [False, True, False, True, False, True], [False, True]]


def test_split_context_is_whole_tool_exchanges(env):
    loaded, enc = env
    e = enc.encode(*tool_trip())
    system, ex = exchanges_of(e)
    sys_len, lengths = system[0].length, [sum(b.length for b in x) for x in ex]
    cut = sys_len + lengths[1] + lengths[2] - 1  # the last exchange can take no whole earlier one
    out = Fitter(loaded.spec, FitOptions(cutoff_len=cut, overflow=("split",))).fit(e)
    assert [p.id for p in out.pieces] == ["s#1", "s#2", "s#3"]
    # piece 3's context would be the tail of exchange 2 if it could be cut: it is none of it
    assert kinds(out.pieces[2].blocks[1:]) == [(10, None), (11, None)]
    cut = sys_len + lengths[1] + lengths[2]
    out = Fitter(loaded.spec, FitOptions(cutoff_len=cut, overflow=("split",))).fit(e)
    assert [p.id for p in out.pieces] == ["s#1", "s#2-3"]
    assert out.tokens_after == [sys_len + lengths[0], cut]


def test_truncate_drops_a_tool_exchange_whole(env):
    loaded, enc = env
    e = enc.encode(*tool_trip())
    system, ex = exchanges_of(e)
    sys_len, lengths = system[0].length, [sum(b.length for b in x) for x in ex]
    # room for all but the first question and its call: the result alone must not stay
    cut = e.length - ex[0][0].length - ex[0][1].length
    out = Fitter(loaded.spec, FitOptions(cutoff_len=cut, overflow=("truncate_text",))).fit(e)
    assert (out.fate, out.tokens_after) == ("truncated", sys_len + lengths[1] + lengths[2])
    assert out.reason == ("dropped 1 oldest text-only exchange(s), 1 with tool calls "
                          "(each dropped with its results and answer)")
    assert kinds(out.pieces[0].blocks[1:]) == kinds(ex[1] + ex[2])


def test_truncate_keeps_a_tool_exchange_with_an_image_whole(env):
    loaded, enc = env
    conv, headers = conv_of([
        ("user", ["draw it"]), ("function_call", ["circle"]), ("observation", [(56, 56), "done"]),
        ("assistant", ["Here it is."]),
        ("user", [" ".join(WORDS * 2)]), ("assistant", ["ok"]),
        ("user", ["bye"]), ("assistant", ["bye"]),
    ])
    e = enc.encode(conv, headers)
    system, ex = exchanges_of(e)
    cut = e.length - sum(b.length for b in ex[1])
    out = Fitter(loaded.spec, FitOptions(cutoff_len=cut, overflow=("truncate_text",))).fit(e)
    assert (out.fate, out.tokens_after, out.reason) == ("truncated", cut, "dropped 1 oldest text-only exchange(s)")
    assert kinds(out.pieces[0].blocks) == [  # the template's default system prompt first
        (None, None), (0, None), (1, "call"), (2, "result"), (3, None), (6, None), (7, None)]


def test_truncate_never_cuts_a_tool_result(env):
    loaded, enc = env
    conv, headers = conv_of([
        ("user", [" ".join(WORDS)]), ("function_call", ["x"]), ("observation", [" ".join(WORDS * 3)]),
        ("assistant", ["found"]),
    ])
    e = enc.encode(conv, headers)
    out = Fitter(loaded.spec, FitOptions(cutoff_len=e.length - 5, overflow=("truncate_text",))).fit(e)
    assert (out.fate, out.tokens_after, out.reason) == (
        "truncated", e.length - 5, "cut 5 token(s) from the end of user text")
    before, after = e.blocks, out.pieces[0].blocks
    assert [len(a.ids) - len(b.ids) for a, b in zip(after, before)] == [0, -5, 0, 0, 0]  # the question, not the result
    assert after[3].ids == before[3].ids


# -- invariants over random conversations ----------------------------------------------------
sizes = st.tuples(st.integers(1, 1500), st.integers(1, 1500)).filter(lambda s: max(s) / min(s) <= 200)
text = st.lists(st.sampled_from(WORDS), min_size=0, max_size=60).map(" ".join)


@st.composite
def conversations(draw, tools=st.booleans()):
    """Exchanges of a question, up to two tool rounds (a call, its results) when `tools`, and an answer; images
    in questions and tool results; with tools the last exchange may end at a call (the call is the target)."""
    tools = draw(tools)
    n_ex = draw(st.integers(1, 5))
    rounds = [draw(st.integers(0, 2)) if tools else 0 for _ in range(n_ex)]
    n_img = draw(st.integers(0, 6))
    slots = [draw(st.integers(0, n_ex + sum(rounds) - 1)) for _ in range(n_img)]  # which question or result
    turns, asked = [], 0

    def ask(role):
        nonlocal asked
        parts = [draw(text)]
        for _ in range(slots.count(asked)):
            parts.insert(draw(st.integers(0, len(parts))), draw(sizes))
        turns.append((role, parts))
        asked += 1

    for k in range(n_ex):
        ask("user")
        for _ in range(rounds[k]):
            turns.append(("function_call", [draw(text)]))
            ask("observation")
        turns.append(("assistant", [draw(text)]))
    if tools and draw(st.booleans()):
        turns[-1] = ("function_call", turns[-1][1])
    if draw(st.booleans()):
        turns.insert(0, ("system", [draw(text)]))
    return turns


def assert_tool_exchanges_whole(piece, whole):
    """No piece starts at a tool result, and no call is apart from its results nor results from their answer:
    each tool result sits right after the turn before it in `whole`, and right before the turn after it."""
    roles = {b.message_index: b.tool for b in whole.blocks}
    last = max(i for i in roles if i is not None)
    body = [b for b in piece.blocks if b.role != "system"]
    assert not body or body[0].tool != "result"
    at = [b.message_index for b in body]
    for j, b in enumerate(body):
        if b.tool == "result":
            assert j > 0 and at[j - 1] == at[j] - 1 and roles[at[j] - 1] == "call"
            if at[j] < last:
                assert j + 1 < len(at) and at[j + 1] == at[j] + 1
        if b.tool == "call" and roles.get(at[j] + 1) == "result":
            assert j + 1 < len(at) and at[j + 1] == at[j] + 1


policy_lists = st.one_of(
    st.permutations(["shrink_images", "truncate_text", "split", "drop"]).flatmap(
        lambda p: st.integers(0, 4).map(lambda n: tuple(p[:n]))),
    st.just(("shrink_images", "truncate_text", "split", "error")),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=conversations(), cutoff=st.integers(8, 3000), overflow=policy_lists,
       share=st.sampled_from([1.0, 0.5]), context=st.booleans())
def test_fit_invariants(env, turns, cutoff, overflow, share, context):
    check_fit(env, turns, cutoff, overflow, share, context)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=conversations(tools=st.just(True)), room=st.floats(0.1, 1.0), overflow=policy_lists,
       context=st.booleans())
def test_fit_invariants_with_tool_exchanges(env, turns, room, overflow, context):
    """Tool conversations with a cutoff_len of a share of their own length, so that most are fitted by a policy."""
    loaded, enc = env
    length = enc.encode(*conv_of(turns)).length
    check_fit(env, turns, max(8, int(room * length)), overflow, 1.0, context)


def check_fit(env, turns, cutoff, overflow, share, context):
    loaded, enc = env
    spec = loaded.spec
    conv, headers = conv_of(turns)
    e = enc.encode(conv, headers)
    fitter = Fitter(spec, FitOptions(cutoff, overflow, 4, share, context))
    try:
        out = fitter.fit(e)
    except SampleError:
        assert overflow[-1] == "error" and e.length > cutoff
        return
    assert out.fate in ("kept", "shrunk", "truncated", "split", "dropped")
    assert out.tokens_before == e.length
    if out.fate == "dropped":
        assert e.length > cutoff and out.pieces == []
        # policies after 'drop' are never tried
        tried = overflow[: overflow.index("drop") + 1] if "drop" in overflow else overflow
        if set(tried) <= {"shrink_images", "drop"} and "shrink_images" in tried:
            floor = with_budget(e, spec, fitter.floor_budget())
            assert floor.length > cutoff
    if out.fate == "kept":
        assert e.length <= cutoff
    # every emitted row carries its input's origin; split pieces are numbered 1..n with no gap, a whole sample 0
    rows = [emit(p, spec) for p in out.pieces]
    assert {(r.file, r.index, r.sample_id) for r in rows} <= {("data.jsonl", 7, "s")}
    pieces = [r.piece for r in rows]
    assert pieces == (list(range(1, len(rows) + 1)) if out.fate == "split" else [0] * len(rows))
    assert out.report()["piece"] == (pieces if out.fate == "split" else 0)
    for piece in out.pieces:
        assert_tool_exchanges_whole(piece, e)
        row = emit(piece, spec).to_dict()
        assert len(row["input_ids"]) <= cutoff
        assert check_row(row, spec, cutoff) == []
        runs, _ = find_runs(row["input_ids"], spec)
        assert [n for _, n in runs] == [g[0] * g[1] * g[2] // 4 for g in row["image_grid_thw"]]
        assert len(runs) == len(row["images"]) == len(row["image_grid_thw"])
        roles = roles_of(row["input_ids"], spec, enc.tokenizer)
        trained = [r for r, lab in zip(roles, row["labels"]) if lab != IGNORE_INDEX]
        assert trained and set(trained) == {"assistant"}
        # every image of the piece comes from the original sample, in the original order
        originals = [i.path for i in e.images]
        positions = [originals.index(p) for p in row["images"]]
        assert positions == sorted(positions)
