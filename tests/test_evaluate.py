import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

# lm-eval, datasets and huggingface_hub read these when first imported: set them before any test runs.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from litgpt import GPT, Config

from lit_dar.data import load_corpus, train_tokenizer

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from lit_dar.evaluate import LitGPTLM, run_lm_eval  # noqa: E402

BLOCK = 64


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail loudly if anything tries to open a network connection."""

    def refuse(self, address, *args, **kwargs):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"network access attempted: {address}")
        return real_connect(self, address, *args, **kwargs)

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer((d.text for d in load_corpus(150_000)), 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model():
    # padded_vocab_size > tokenizer vocab: greedy decoding must never pick a padding id
    config = Config(n_layer=2, n_embd=32, n_head=4, vocab_size=300, padded_vocab_size=320, block_size=BLOCK)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():  # sharper distributions than the default init, so greedy paths are distinct
        model.lm_head.weight.mul_(30)
    return model.eval()


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]


def _direct_loglikelihood(model, tokenizer, context, continuation):
    """Score `continuation` after `context` straight from the model's logits."""
    if context:  # lm-eval's split: the context's own tokens, then what encoding both adds after them
        ctx = tokenizer.encode(context).tolist()
        cont = tokenizer.encode(context + continuation).tolist()[len(ctx) :]
        whole, n_cont = ctx + cont, len(cont)
    else:  # an empty context is conditioned on bos alone
        cont = tokenizer.encode(continuation, bos=False).tolist()
        whole, n_cont = [tokenizer.bos_id] + cont, len(cont)
    whole = whole[-(BLOCK + 1) :]  # what fits in the window
    rows = _logprobs(model, whole[:-1])[-n_cont:]
    targets = whole[-n_cont:]
    total = sum(rows[i, t].item() for i, t in enumerate(targets))
    greedy = all(rows[i].argmax().item() == t for i, t in enumerate(targets))
    return total, greedy


def _manual_greedy(model, tokenizer, context, max_new, stops):
    """Reference decoding: full forward pass per token, no KV cache."""
    ids = tokenizer.encode(context).tolist()
    out = []
    for _ in range(max_new):
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1, :300]
        token = int(logits.argmax())
        if token == tokenizer.eos_id:
            break
        ids.append(token)
        out.append(token)
        text = tokenizer.decode(torch.tensor(out))
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[: min(hits)]
    return tokenizer.decode(torch.tensor(out))


def test_loglikelihood_matches_direct_computation(model, tokenizer):
    lm = LitGPTLM(model, tokenizer, batch_size=3)
    assert lm.max_length == BLOCK and lm.prefix_token_id == tokenizer.bos_id == 1 and lm.eot_token_id == 0
    long_context = "import os\n" * 40  # longer than the context window: truncated on the left
    pairs = [
        ("def add(a, b):\n    return", " a + b"),
        ("import", " os"),
        ("", "print('hello')"),
        ("for i in range(10): ", "pass"),  # trailing space moves into the continuation
        ("x =", " [1, 2, 3]\ny = x"),
        (long_context, "import sys"),
    ]
    # add a continuation that is the model's own greedy token, so is_greedy=True is covered
    for context in ("class", "def", "x = 1\n", "import", "return"):
        ids = tokenizer.encode(context).tolist()
        token = int(_logprobs(model, ids)[-1].argmax())
        cont = tokenizer.decode(torch.tensor([token]))
        if cont and tokenizer.encode(context + cont).tolist() == ids + [token]:
            pairs.append((context, cont))
            break
    else:
        pytest.fail("no context with a stable greedy token")

    results = lm.loglikelihood(_requests("loglikelihood", pairs))
    assert len(results) == len(pairs)
    for (context, cont), (logprob, greedy) in zip(pairs, results):
        stripped = context.rstrip()  # lm-eval moves trailing whitespace into the continuation
        expected, expected_greedy = _direct_loglikelihood(model, tokenizer, stripped, context[len(stripped) :] + cont)
        assert logprob == pytest.approx(expected, abs=1e-4), (context, cont)
        assert greedy == expected_greedy
        assert logprob < 0
    assert results[-1][1] is True

    # batching and padding do not change scores
    single = LitGPTLM(model, tokenizer, batch_size=1).loglikelihood(_requests("loglikelihood", pairs))
    assert [r[0] for r in single] == pytest.approx([r[0] for r in results], abs=1e-4)


def test_loglikelihood_rolling(model, tokenizer):
    lm = LitGPTLM(model, tokenizer, batch_size=4)
    short = "def f(x):\n    return x * 2\n"
    long = "".join(f"value_{i} = {i} * {i}\n" for i in range(30))
    ids_short = tokenizer.encode(short, bos=False).tolist()
    ids_long = tokenizer.encode(long, bos=False).tolist()
    assert len(ids_short) < BLOCK < 2 * BLOCK < len(ids_long)

    def reference(ids):
        # token i is predicted from the window that lm-eval's disjoint rolling scheme gives it
        stream = [tokenizer.bos_id] + ids
        total = 0.0
        for start in range(0, len(ids), BLOCK):
            end = min(start + BLOCK, len(ids))
            ctx_start = max(0, end - BLOCK) if start else 0
            logp = _logprobs(model, stream[ctx_start:end])
            for i in range(start, end):
                total += logp[i - ctx_start, ids[i]].item()
        return total

    totals = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,)]))
    assert totals == pytest.approx([reference(ids_short), reference(ids_long)], abs=1e-3)


def test_generate_until_matches_manual_greedy_loop(model, tokenizer):
    lm = LitGPTLM(model, tokenizer, batch_size=2, max_gen_toks=12)
    prompts = ["def main():\n", "import os\nimport", "class Foo:", "x = 1\n", "def main():\n"]
    free = [_manual_greedy(model, tokenizer, p, 12, []) for p in prompts]
    assert all(free) and len(set(free)) > 1
    # a stop string taken from inside the first free-running output must cut it
    stop = free[0][3:5]
    args = [
        (prompts[0], {"until": [stop], "max_gen_toks": 12}),
        (prompts[1], {"until": "\n\n\n", "do_sample": False}),
        (prompts[2], {"until": [], "max_gen_toks": 5}),
        (prompts[3], {"until": ["zzzz", stop], "max_gen_toks": 20, "temperature": 0}),
        (prompts[4], {}),
        ("a" * 200, {"max_gen_toks": 3}),  # prompt cut on the left to leave room in the window
    ]
    expected = [
        _manual_greedy(model, tokenizer, prompts[0], 12, [stop]),
        _manual_greedy(model, tokenizer, prompts[1], 12, ["\n\n\n"]),
        _manual_greedy(model, tokenizer, prompts[2], 5, []),
        _manual_greedy(model, tokenizer, prompts[3], 20, ["zzzz", stop]),
        free[4],
    ]
    out = lm.generate_until(_requests("generate_until", args))
    assert out[:5] == expected
    assert len(expected[0]) < len(free[0]) and stop not in expected[0]
    assert isinstance(out[5], str)
    assert all(block.attn.kv_cache is None for block in model.transformer.h)  # cache released

    with pytest.raises(ValueError, match="greedily only"):
        lm.generate_until(_requests("generate_until", [("x", {"do_sample": True, "temperature": 0.7})]))


def _write_tasks(root: Path) -> Path:
    docs = [
        {"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "answer": 0},
        {"question": "import", "choices": ["os", "xyz"], "answer": 0},
        {"question": "for i in", "choices": ["range(10):", "banana", "()"], "answer": 0},
        {"question": "class Foo(", "choices": ["object):", "]]]"], "answer": 0},
        {"question": "x = [1, 2,", "choices": ["3]", "):"], "answer": 1},
    ]
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    common = (
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {data}}}\n"
        f"  cache_dir: {root / 'hf_cache'}\n"
        "test_split: test\n"
    )
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common + "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + common + "output_type: generate_until\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{choices[answer]}}"\n'
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + common + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{question}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    return tasks


def test_run_lm_eval_on_local_tasks(model, tokenizer, tmp_path):
    tasks = _write_tasks(tmp_path)
    model.train()
    torch.manual_seed(123)
    random.seed(5)
    expected_draws = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(5)

    out = run_lm_eval(
        model, tokenizer, ["tiny_mc", "tiny_gen", "tiny_ppl"], include_path=tasks, include_defaults=False,
        batch_size=4, bootstrap_iters=0,
    )

    assert model.training  # mode restored
    assert torch.equal(torch.rand(3), expected_draws[0]) and random.random() == expected_draws[1]  # RNG untouched
    model.eval()
    results = out["results"]
    assert set(results) == {"tiny_mc", "tiny_gen", "tiny_ppl"}
    assert results["tiny_mc"]["sample_len"] == 5
    assert 0.0 <= results["tiny_gen"]["exact_match,none"] <= 1.0
    assert math.isfinite(results["tiny_ppl"]["word_perplexity,none"]) and results["tiny_ppl"]["bits_per_byte,none"] > 0

    # the harness' accuracy is the argmax of the adapter's choice log-likelihoods
    lm = LitGPTLM(model, tokenizer)
    docs = [json.loads(line) for line in (tmp_path / "tiny.jsonl").read_text().splitlines()]
    correct = 0
    for doc in docs:
        scores = lm.loglikelihood(_requests("loglikelihood", [(doc["question"], " " + c) for c in doc["choices"]]))
        correct += max(range(len(scores)), key=lambda i: scores[i][0]) == doc["answer"]
    assert results["tiny_mc"]["acc,none"] == pytest.approx(correct / len(docs))

    with pytest.raises(KeyError, match="nonexistent_task"):
        run_lm_eval(model, tokenizer, "nonexistent_task", include_path=tasks, include_defaults=False)


def test_module_imports_without_lm_eval():
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "import lit_dar.evaluate as e\n"
        "try:\n    e.LitGPTLM\nexcept ImportError as err:\n    print(err)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'lit-dar[eval]'" in proc.stdout
