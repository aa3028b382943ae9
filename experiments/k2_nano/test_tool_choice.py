"""experiments/k2_nano/tool_choice.py: the teacher-forced first-pick read of the selection skill, on the shipped model.

Opt-in: `pytest --run-experiments` (and `--run-slow` for the picks on 20 conversations)."""

import json
import re
from pathlib import Path

import pytest
import torch

from experiments.k2_nano import tool_choice
from kimi_k2.data.synth import train_episodes
from kimi_k2.model import K2ForCausalLM
from kimi_k2.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
NANO = ROOT / "models" / "k2-nano-instruct"


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return K2ForCausalLM.from_pretrained(NANO, dtype=torch.float32).eval(), Tokenizer.from_pretrained(NANO)


def test_the_section_opening_is_the_models_next_token_probability(nano):
    model, tok = nano
    c = tool_choice.heldout_choices()[0]
    names = [t["function"]["name"] for t in c.tools]
    scores = [tool_choice.opening_logprob(model, tok, c.messages, c.tools, n) for n in names]
    prompt = tok.encode(tok.apply_chat_template(c.messages, c.tools, add_generation_prompt=True),
                        allow_special=True)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor(prompt)[None])[0, -1].float(), -1)
    for whole, opening in scores:
        assert opening == pytest.approx(lp[tok.special_tokens["<|tool_calls_section_begin|>"]].item(), abs=1e-4)
        assert whole < opening < 0  # the name's tokens cost more


@pytest.mark.slow  # 20 conversations, each tool scored by a forward pass: minutes on a loaded 2-core box
def test_picks_on_train_tool_conversations(nano, tmp_path):
    """The shipped model picks the right train tool (a skill it was trained on) nearly always."""
    model, tok = nano
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(e.conversation()) + "\n" for e in train_episodes(123, 60)))
    choices = tool_choice.conversation_choices(str(path), 20)
    assert len(choices) == 20 and all(c.messages[-1]["role"] == "user" for c in choices)
    picks = tool_choice.first_picks(model, tok, choices)
    assert sum(picks.total.values()) == 20 and sum(picks.right.values()) >= 17
    assert len(picks.p_right) == 20 and sum(picks.p_right) / 20 > 0.8
    corrected = tool_choice.first_picks(model, tok, choices[:4], prior=True)  # scores minus a neutral request's
    assert sum(corrected.total.values()) == 4 and corrected.p_call[True] == picks.p_call[True][:4]
    right = sum(picks.right.values())
    assert re.fullmatch(rf"first pick {right}/20, mean p\(right tool\) [01]\.\d{{3}} \| "
                        r"p\(call\) when needed [01]\.\d\d, on refusals nan", picks.line())


def test_heldout_choices_cover_the_benchmark():
    choices = tool_choice.heldout_choices()
    assert len(choices) == 100
    assert sum(c.want is None for c in choices) == 10  # the refusals
    assert all(c.want is None or c.want in {t["function"]["name"] for t in c.tools} for c in choices)


def test_probes_rewrite_the_request():
    c = tool_choice.Choice([{"role": "user", "content": "What is the Tide height of Brusk? Thanks"}],
                           [{"type": "function", "function": {"name": "get_tide_height",
                                                              "description": "Get the tide height of a place."}}],
                           "get_tide_height")
    assert tool_choice.rewrite(c, "name").messages[-1]["content"] == "What is the Tide height of Brusk? Thanks " \
                                                                     "(use get_tide_height)"
    assert tool_choice.rewrite(c, "mask").messages[-1]["content"] == "What is the thing thing of Brusk? Thanks"
    assert tool_choice.rewrite(c, "mask+name").messages[-1]["content"].endswith("thing of Brusk? Thanks "
                                                                                 "(use get_tide_height)")
    assert tool_choice.rewrite(c, "prior") is c and c.messages[-1]["content"].startswith("What is the Tide")
    refusal = tool_choice.Choice(c.messages, c.tools, None)
    assert tool_choice.rewrite(refusal, "mask") is refusal
