"""Structured outputs end to end on a tiny random model: whatever garbage the model would
sample, the mask forces it into the grammar's shape, for many seeds."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import torch

from asyncengine.engine_core import EngineCore
from asyncengine.sampling_params import InvalidRequestError, SamplingParams
from asyncengine.structured import StructuredSpec
from tests.invariance_harness import Req, make_engine, run

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": -50, "maximum": 999},
        "color": {"enum": ["red", "green", "dark blue"]},
        "name": {"type": "string", "pattern": "^[a-z ]{0,6}$"},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["ok", "n", "color", "name", "tags"],
}
EMAIL = r"[a-z]{1,6}@[a-z]{2,4}\.(com|org)"
ARITH = 'root ::= num (op num){0,3}\nnum ::= [1-9] [0-9]{0,2}\nop ::= " + " | "*"'
ARITH_RE = r"[1-9][0-9]{0,2}(( \+ |\*)[1-9][0-9]{0,2}){0,3}"
CHOICES = ["yes", "no", 'it "depends"', "東京\n"]
EOS = 2


@pytest.fixture(scope="module")
def engine(llama_dir: Path) -> Iterator[EngineCore]:
    old = torch.get_num_threads()
    yield make_engine(llama_dir, num_threads=1, num_kv_blocks=512)
    torch.set_num_threads(old)


def _texts(engine: EngineCore, spec: StructuredSpec, seeds: range, **kw: object) -> list[tuple[str, str | None]]:
    reqs = [Req(f"s{s}", (1, 7 + s % 50, 40, 9), SamplingParams(seed=s, structured=spec, **kw)) for s in seeds]  # type: ignore[arg-type]
    out = run(engine, reqs)
    return [(engine.tokenizer.decode(list(out[r.rid].token_ids), skip_special_tokens=True), out[r.rid].finish_reason)
            for r in reqs]


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=1.3, top_p=0.95), dict(temperature=0.0)])
def test_json_schema_outputs_validate(engine: EngineCore, sampling: dict[str, float]) -> None:
    spec = StructuredSpec.json_schema(SCHEMA, any_whitespace=False)
    for text, reason in _texts(engine, spec, range(24), max_tokens=200, **sampling):
        assert reason == "stop", text  # the schema bounds the length: every output completes
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_schema_with_whitespace_and_top_k(engine: EngineCore) -> None:
    """Whitespace is free between JSON tokens (as in vLLM): a random model may spend every
    token on it. Each output is then a prefix of a valid document: with the whitespace
    outside strings dropped it is a prefix of the compact form's language, which the
    regex below spells for the first property."""
    spec = StructuredSpec.json_schema(SCHEMA)
    for text, reason in _texts(engine, spec, range(16), max_tokens=120, temperature=0.8, top_k=40, min_p=0.01):
        if reason == "stop":
            jsonschema.validate(json.loads(text), SCHEMA)
        else:
            assert reason == "length"
            compact = re.sub(r"\s+", "", text)
            assert '{"ok":true,"n":'.startswith(compact[:6]) or '{"ok":false'.startswith(compact[:6]), text


def test_length_bounded_strings_parse(engine: EngineCore) -> None:
    """xgrammar alone lets control characters into a maxLength string; ours never do."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 5}},
              "required": ["s"]}
    spec = StructuredSpec.json_schema(schema, any_whitespace=False)
    for text, reason in _texts(engine, spec, range(24), max_tokens=80):
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), schema)  # json.loads is strict: no control characters


def test_regex_choice_and_grammar_outputs_match(engine: EngineCore) -> None:
    for text, reason in _texts(engine, StructuredSpec.regex(EMAIL), range(24), max_tokens=60):
        assert reason == "stop" and re.fullmatch(EMAIL, text), text
    got = _texts(engine, StructuredSpec.choice(CHOICES), range(24), max_tokens=30)
    assert all(reason == "stop" and text in CHOICES for text, reason in got), got
    assert len({t for t, _ in got}) > 1  # the random model really chooses
    for text, reason in _texts(engine, StructuredSpec.grammar(ARITH), range(24), max_tokens=60):
        assert reason == "stop" and re.fullmatch(ARITH_RE, text), text


def test_json_object_is_an_object(engine: EngineCore) -> None:
    for text, reason in _texts(engine, StructuredSpec.json_object(any_whitespace=False), range(16), max_tokens=150):
        if reason == "stop":
            assert isinstance(json.loads(text), dict), text
        else:
            assert reason == "length" and text.startswith("{")


def test_cannot_finish_before_max_tokens_is_length(engine: EngineCore) -> None:
    for text, reason in _texts(engine, StructuredSpec.regex("a{300}"), range(3), max_tokens=10):
        assert reason == "length" and text and set(text) == {"a"}


def test_grammar_end_stops_even_with_ignore_eos_or_min_tokens(engine: EngineCore) -> None:
    spec = StructuredSpec.choice(["yes", "no"])
    for kw in (dict(ignore_eos=True), dict(min_tokens=20)):
        for text, reason in _texts(engine, spec, range(4), max_tokens=30, **kw):
            assert reason == "stop" and text in ("yes", "no")


def test_eos_only_where_the_grammar_accepts(engine: EngineCore) -> None:
    """Without whitespace the object ends once: EOS is allowed at exactly one position."""
    from asyncengine.structured.bitmask import replay_masks

    spec = StructuredSpec.json_schema(SCHEMA, any_whitespace=False)
    reqs = [Req(f"e{s}", (1, 5, 9), SamplingParams(seed=s, max_tokens=200, structured=spec)) for s in range(8)]
    out = run(engine, reqs)
    for r in reqs:
        ids = list(out[r.rid].token_ids)
        assert ids[-1] == EOS and EOS not in ids[:-1]
        masks = replay_masks(engine.structured.backend.start(spec), ids, engine.model_info.vocab_size)
        assert masks[:, EOS].tolist() == [False] * (len(ids) - 1) + [True]


def test_free_requests_unchanged_by_structured_neighbours(engine: EngineCore) -> None:
    free = Req("free", (3, 4, 5, 6), SamplingParams(seed=9, max_tokens=12, logprobs=3, ignore_eos=True))
    want = run(engine, [free])["free"]
    spec = StructuredSpec.json_schema(SCHEMA, any_whitespace=False)
    crowd = [Req(f"c{i}", (1, 2, i + 3), SamplingParams(seed=i, max_tokens=40, structured=spec)) for i in range(7)]
    assert run(engine, [*crowd[:3], free, *crowd[3:]])["free"] == want


@pytest.mark.parametrize(("spec", "param"), [
    (StructuredSpec.json_schema({"type": "object", "properties": {"a": {"type": "nope"}}}, param="guided_json"),
     "guided_json"),
    (StructuredSpec.json_schema({"$ref": "#/missing"}), "structured_outputs.json"),
    (StructuredSpec.regex("(ab"), "structured_outputs.regex"),
    (StructuredSpec.regex("[z-a]"), "structured_outputs.regex"),
    (StructuredSpec.grammar('root ::= "a" undefined_rule'), "structured_outputs.grammar"),
])
def test_invalid_specs_are_rejected_and_leak_nothing(engine: EngineCore, spec: StructuredSpec, param: str) -> None:
    free_before = engine.pool.num_free_blocks
    with pytest.raises(InvalidRequestError) as err:
        engine.add_request("bad", [1, 2, 3], SamplingParams(structured=spec))
    assert err.value.param == param and str(err.value).startswith(f"invalid {param}: ")
    assert "bad" not in engine.requests and not engine.has_unfinished()
    assert engine.pool.num_free_blocks == free_before


def test_compiled_grammars_are_cached_per_spec(engine: EngineCore) -> None:
    backend = engine.structured.backend
    spec = StructuredSpec.regex(r"cache-[0-9]{3}")
    before = backend.num_compiles
    run(engine, [Req(f"k{i}", (1, 2), SamplingParams(seed=i, max_tokens=20, structured=spec)) for i in range(5)])
    assert backend.num_compiles == before + 1
    run(engine, [Req("k-other", (1, 2), SamplingParams(max_tokens=20, structured=StructuredSpec.regex(r"x{2}")))])
    assert backend.num_compiles == before + 2
