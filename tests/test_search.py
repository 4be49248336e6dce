"""`loramix search`: batched evaluation against PEFT, LoRAHub's own composition, planted problems, CLI and errors.

Models are tiny random-weight Llama / T5 / GPT-2 built from configs (initializer_range 0.3 so that the logits are
peaked and adapters matter), with a character-level tokenizer built locally; adapters are made by PEFT itself.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import make_peft_adapter, random_model
from peft import PeftModel
from peft.utils.save_and_load import get_peft_model_state_dict, set_peft_model_state_dict

import loramix
from loramix import save_adapter
from loramix.cli import main
from loramix.errors import IncompatibleAdaptersError, LoramixError, SearchError
from loramix.weight_search import search
from loramix.weight_search.evaluator import Evaluator
from loramix.weight_search.objective import as_examples, build_batch, read_examples

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 "
SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
VOCAB = 64
PLANTED = [0.9, -0.6, 0.4]


def char_tokenizer(*, seq2seq: bool):
    """A character-level tokenizer (ids 0–3 special): Llama-style BOS in front, or T5-style </s> at the end."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {**SPECIAL, **{c: i + len(SPECIAL) for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    template = ("$A </s>", [("</s>", 2)]) if seq2seq else ("<s> $A", [("<s>", 1)])
    tk.post_processor = processors.TemplateProcessing(single=template[0], special_tokens=template[1])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def llama(seed: int = 0, layers: int = 2):
    return random_model(
        "llama",
        seed=seed,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.3,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def t5(seed: int = 0):
    settings = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, initializer_factor=3.0)
    return random_model(
        "t5",
        seed=seed,
        task="seq2seq-lm",
        vocab_size=VOCAB,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=2,
        **settings,
    )


def gpt2(seed: int = 0):
    return random_model(
        "gpt2", seed=seed, vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.3
    )


class Setup:
    """A base folder (model + tokenizer) and three PEFT adapters on it."""

    def __init__(self, root: Path, factory, targets: list[str], *, seq2seq: bool = False, ranks=(4, 4, 4)) -> None:
        self.factory, self.seq2seq = factory, seq2seq
        self.tokenizer = char_tokenizer(seq2seq=seq2seq)
        self.base = root / "base"
        factory().save_pretrained(self.base)
        self.tokenizer.save_pretrained(self.base)
        self.adapters = [
            make_peft_adapter(
                factory,
                root,
                f"task{i}",
                seed=i + 1,
                r=r,
                lora_alpha=2 * r,
                target_modules=targets,
                base_model_name_or_path="tiny-base",
            ).path
            for i, r in enumerate(ranks)
        ]

    def evaluator(self, examples, composition: str, **kwargs) -> Evaluator:
        batch = build_batch(
            as_examples(examples),
            self.tokenizer,
            encoder_decoder=self.seq2seq,
            add_eos=kwargs.pop("add_eos", True),
            decoder_start_token_id=0,
        )
        adapters = [loramix.load_adapter(a) for a in self.adapters]
        return Evaluator(
            self.factory(), adapters, batch, composition=composition, encoder_decoder=self.seq2seq, **kwargs
        )

    def lorahub_peft(self, weights) -> PeftModel:
        """PEFT model built LoRAHub's way (sail-sg/lorahub get_score): Σ wᵢ·state_dictᵢ over lora_A and lora_B
        alike, set into a PeftModel of the first adapter with set_peft_model_state_dict."""
        cache = [get_peft_model_state_dict(PeftModel.from_pretrained(self.factory(), str(a))) for a in self.adapters]
        mixed = {k: sum(w * sd[k] for w, sd in zip(weights, cache)) for k in cache[0]}
        model = PeftModel.from_pretrained(self.factory(), str(self.adapters[0])).eval()
        set_peft_model_state_dict(model, mixed)
        return model

    def delta_peft(self, weights, folder: Path) -> PeftModel:
        """PEFT model of the exact Σ wᵢ·sᵢ·Bᵢ·Aᵢ (loramix's cat, itself tested against PEFT in test_combine)."""
        loramix.save_adapter(loramix.combine(self.adapters, weights=weights, method="cat"), folder, overwrite=True)
        return PeftModel.from_pretrained(self.factory(), str(folder)).eval()

    def planted_examples(self, model, n: int = 8, seed: int = 0) -> list[dict]:
        """Greedy outputs (6 characters; special tokens suppressed) of ``model`` on random lowercase inputs."""
        rng = random.Random(seed)
        inputs = ["".join(rng.choice(CHARS[:26]) for _ in range(rng.randint(4, 7))) for _ in range(n)]
        out = []
        for text in inputs:
            ids = self.tokenizer(text, return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(
                    **ids, max_new_tokens=6, do_sample=False, suppress_tokens=list(SPECIAL.values()), pad_token_id=0
                )
            new = gen[0, 1:] if self.seq2seq else gen[0, ids["input_ids"].shape[1] :]
            out.append({"input": text, "output": self.tokenizer.decode(new, skip_special_tokens=True)})
        return out


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("causal"), llama, ["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("t5"), t5, ["q", "v", "wo"], seq2seq=True)


EXAMPLES = [{"input": "hello", "output": "world"}, {"input": "abc", "output": "cba"}, {"input": "xy", "output": "zz9"}]


def _peft_loss(setup: Setup, model, examples) -> float:
    """The mean output-token cross-entropy computed by transformers itself (outputs.loss with -100 labels)."""
    batch = build_batch(as_examples(examples), setup.tokenizer, encoder_decoder=setup.seq2seq, decoder_start_token_id=0)
    with torch.no_grad():
        if setup.seq2seq:
            return float(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            )
        return float(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        )


# Tolerance: float32 throughout; the hooks add x·Aᵀ·Bᵀ to the layer output where PEFT computes the same product in
# another order (and merges √s differently), so logits agree to ~1e-6 relative; 1e-4 leaves room for the 2-layer
# network to amplify rounding, and is far below the effect of any weight change (≥1e-1 here).
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
@pytest.mark.parametrize("composition", ["lorahub", "delta"])
def test_batched_population_equals_each_candidate_alone_and_peft(kind, composition, request, tmp_path):
    setup = request.getfixturevalue(kind)
    population = torch.tensor([[0.0, 0.0, 0.0], [0.5, -1.0, 0.25], [1.5, 0.3, -0.7], [-0.2, 0.9, 1.1]])
    with setup.evaluator(EXAMPLES, composition) as ev:
        together = ev.cross_entropy(population)
        alone = torch.cat([ev.cross_entropy(w[None]) for w in population])
        ev.max_candidates = 3
        in_chunks = ev.cross_entropy(population)
    # 1e-5 relative: the same float32 arithmetic on differently shaped batches (matmul blocking may differ, nothing
    # else); relative because the random T5's losses are ~17 nats, where float32 rounding alone is ~2e-6.
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(in_chunks, alone, rtol=1e-5, atol=1e-6)
    assert together.unique().numel() == 4  # the candidates really differ
    w = population[2].tolist()
    peft_model = setup.lorahub_peft(w) if composition == "lorahub" else setup.delta_peft(w, tmp_path / "d")
    assert float(alone[2]) == pytest.approx(_peft_loss(setup, peft_model, EXAMPLES), rel=1e-4)


def test_lorahub_composition_equals_peft_built_lorahubs_way(causal, tmp_path):
    weights = [0.7, -0.4, 1.2]
    reference = causal.lorahub_peft(weights)
    ids = causal.tokenizer(["hello world", "abcdefg"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = reference(**ids).logits
        with causal.evaluator(EXAMPLES, "lorahub") as ev, ev.applied(weights):
            hooked = ev.model(**ids).logits
        plain = causal.factory()(**ids).logits
    torch.testing.assert_close(hooked, expected, **TOL)
    assert (expected - plain).abs().max() > 0.1  # the composition changes the outputs a lot
    # A and B mixed separately is not the weighted sum of ΔWs (cross terms), nor PEFT's √w `linear`:
    for other in (causal.delta_peft(weights, tmp_path / "cat"),):
        with torch.no_grad():
            assert (other(**ids).logits - expected).abs().max() > 1e-2
    # What search writes for these weights reproduces LoRAHub's model when PEFT loads it.
    written = loramix.combine(causal.adapters, weights=weights, method="lorahub")
    save_adapter(written, tmp_path / "written")
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(causal.factory(), str(tmp_path / "written")).eval()(**ids).logits
    torch.testing.assert_close(loaded, expected, **TOL)


@pytest.mark.parametrize(
    ("composition", "optimizer"),
    [
        ("delta", "cobyla"),
        ("delta", "cma"),
        ("delta", "adam"),
        ("lorahub", "cobyla"),
        ("lorahub", "cma"),
        ("lorahub", "adam"),
    ],
)
def test_planted_mixture_is_recovered(causal, composition, optimizer, tmp_path):
    planted_model = (
        causal.lorahub_peft(PLANTED) if composition == "lorahub" else causal.delta_peft(PLANTED, tmp_path / "planted")
    )
    examples = causal.planted_examples(planted_model)
    with causal.evaluator(examples, composition, add_eos=False) as ev:
        planted, uniform = ev.cross_entropy(torch.tensor([PLANTED, [1 / 3] * 3])).tolist()
    assert uniform - planted > 0.5  # the problem is informative
    steps = {"cobyla": 40, "cma": 15, "adam": 40}[optimizer]
    result = search(
        causal.base,
        causal.adapters,
        examples,
        composition=composition,
        optimizer=optimizer,
        steps=steps,
        l1=0.0,
        add_eos=False,
        device="cpu",
        seed=1,
    )
    # "Well below uniform": at least 80% of the way from the uniform mixture's loss to the planted weights' loss.
    assert result.loss <= uniform - 0.8 * (uniform - planted), (result.weights, result.loss, planted, uniform)
    assert len(result.history) == steps and result.history == sorted(result.history, reverse=True)
    assert all(-1.5 <= w <= 1.5 for w in result.weights)


def test_seq2seq_search_and_written_adapter(seq2seq, tmp_path):
    examples = seq2seq.planted_examples(seq2seq.delta_peft(PLANTED, tmp_path / "planted"))
    result = search(
        seq2seq.base,
        seq2seq.adapters,
        examples,
        composition="delta",
        optimizer="cma",
        steps=10,
        l1=0.0,
        add_eos=False,
        device="cpu",
    )
    with seq2seq.evaluator(examples, "delta", add_eos=False) as ev:
        zero, uniform = ev.cross_entropy(torch.tensor([[0.0] * 3, [1 / 3] * 3])).tolist()
    assert result.loss < min(zero, uniform) - 0.3
    save_adapter(result.adapter, tmp_path / "out")
    model = PeftModel.from_pretrained(seq2seq.factory(), str(tmp_path / "out")).eval()
    batch = build_batch(
        as_examples(examples), seq2seq.tokenizer, encoder_decoder=True, add_eos=False, decoder_start_token_id=0
    )
    with torch.no_grad():
        loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    assert float(loss) == pytest.approx(result.cross_entropy, rel=1e-4)


def test_gpt2_conv1d_layers(tmp_path):
    setup = Setup(tmp_path, gpt2, ["c_attn", "c_proj"])
    w = [0.5, -0.8, 1.0]
    with setup.evaluator(EXAMPLES, "delta") as ev:
        ours = float(ev.cross_entropy([w])[0])
    assert ours == pytest.approx(_peft_loss(setup, setup.delta_peft(w, tmp_path / "d"), EXAMPLES), rel=1e-4)


def test_seeded_and_reproducible(causal):
    runs = [
        search(causal.base, causal.adapters, EXAMPLES, optimizer="cma", steps=3, seed=s, device="cpu")
        for s in (5, 5, 6)
    ]
    assert runs[0].weights == runs[1].weights and runs[0].history == runs[1].history
    assert runs[0].weights != runs[2].weights


def test_the_base_is_loaded_without_hub_kernels(causal, monkeypatch):
    """transformers 5 kernelizes a model by default (fetching kernels from the Hub on a GPU): the search loads its
    base with transformers' own layers, so it runs offline and every candidate sees the same numerics."""
    import transformers

    def refuse(self, use_kernels, *args, **kwargs):
        assert not use_kernels, "the search asked transformers for Hub kernels"

    monkeypatch.setattr(transformers.PreTrainedModel, "set_use_kernels", refuse)
    assert search(causal.base, causal.adapters, EXAMPLES, optimizer="cma", steps=1, device="cpu").weights


def test_cli_writes_search_json_and_a_peft_adapter(causal, tmp_path):
    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    out = tmp_path / "out"
    args = [
        "search",
        "--base",
        str(causal.base),
        "--examples",
        str(examples),
        *map(str, causal.adapters),
        "--optimizer",
        "cobyla",
        "--steps",
        "6",
        "--l1",
        "0.1",
        "--bounds=-1,1",
        "--device",
        "cpu",
        "-o",
        str(out),
    ]
    result = CliRunner().invoke(main, ["-q", *args])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out}: weights ["), result.output
    report = json.loads((out / "search.json").read_text())
    assert len(report["weights"]) == 3 and len(report["history"]) == 6 and report["evaluations"] == 6
    assert report["settings"]["bounds"] == [-1.0, 1.0] and report["settings"]["l1"] == 0.1
    assert report["loss"] == pytest.approx(report["history"][-1], rel=1e-5)
    assert report["settings"]["adapters"] == [str(a) for a in causal.adapters]
    with causal.evaluator(EXAMPLES, "lorahub") as ev:
        expected = float(ev.cross_entropy([report["weights"]])[0])
    assert _peft_loss(causal, PeftModel.from_pretrained(causal.factory(), str(out)).eval(), EXAMPLES) == (
        pytest.approx(expected, rel=1e-4)
    )
    again = CliRunner().invoke(main, ["-q", *args])
    assert again.exit_code == 2 and "not empty" in again.output and again.output.count("\n") == 1


def test_errors_are_one_line(causal, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\n\n{"input": "a"\n')
    with pytest.raises(SearchError, match=r"bad\.jsonl:3: not valid JSON"):
        read_examples(bad)
    bad.write_text('{"input": "a", "output": "b"}\n{"input": 1, "output": "b"}\n')
    result = CliRunner().invoke(
        main,
        [
            "search",
            "--base",
            str(causal.base),
            "--examples",
            str(bad),
            str(causal.adapters[0]),
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 2 and "bad.jsonl:2:" in result.output and result.output.count("\n") == 1
    uneven = Setup(tmp_path / "uneven", llama, ["q_proj"], ranks=(4, 2, 4))
    with pytest.raises(IncompatibleAdaptersError, match="equal ranks"):
        search(uneven.base, uneven.adapters, EXAMPLES, composition="lorahub", steps=1, device="cpu")
    search(uneven.base, uneven.adapters, EXAMPLES, composition="delta", steps=1, device="cpu")  # any ranks
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (uneven.base / name).unlink(missing_ok=True)
    with pytest.raises(SearchError, match="tokenizer"):
        search(uneven.base, uneven.adapters, EXAMPLES, composition="delta", steps=1, device="cpu")
    assert issubclass(SearchError, LoramixError)


def test_chat_template_wraps_the_input_once(causal):
    tok = char_tokenizer(seq2seq=False)
    tok.chat_template = "{{ bos_token }}q {{ messages[0]['content'] }} a "
    plain = build_batch(as_examples([{"input": "q hi a ", "output": "yo"}]), tok, encoder_decoder=False)
    chat = build_batch(as_examples([{"input": "hi", "output": "yo"}]), tok, encoder_decoder=False, chat_template=True)
    assert chat["input_ids"].tolist() == plain["input_ids"].tolist()  # one BOS, the template's
    assert chat["labels"].tolist() == plain["labels"].tolist()
    with pytest.raises(SearchError, match="no chat template"):
        build_batch(as_examples(EXAMPLES), causal.tokenizer, encoder_decoder=False, chat_template=True)


def test_cli_merge_into_writes_the_base_with_the_searched_adapter(causal, tmp_path):
    from transformers import AutoModelForCausalLM

    examples = tmp_path / "ex.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    out = tmp_path / "merged"
    args = ["-q", "search", "--base", str(causal.base), "--examples", str(examples), *map(str, causal.adapters)]
    result = CliRunner().invoke(main, [*args, "--steps", "5", "--device", "cpu", "--merge-into", str(causal.base),
                                       "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads((out / "search.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with causal.evaluator(EXAMPLES, "lorahub") as ev:
        expected = float(ev.cross_entropy([report["weights"]])[0])
    # The checkpoint is bf16 (merge_into_base's default): weights rounded to 8 bits of mantissa move the loss by
    # well under 1% here, while the searched adapter moves it by far more than that (checked against the base).
    assert _peft_loss(causal, merged, EXAMPLES) == pytest.approx(expected, rel=1e-2)
    assert abs(_peft_loss(causal, causal.factory(), EXAMPLES) - expected) > 0.05


@pytest.mark.parametrize(("composition", "merge"), [("lorahub", False), ("delta", True)])
def test_search_output_carries_a_recipe_that_repeats_the_searched_combination(causal, tmp_path, composition, merge):
    # "Repeats" means: the sources at the searched weights, combined by the composition's method, give the same
    # adapter (or merged checkpoint) bit for bit; the search itself (base, examples, optimiser) is in search.json.
    root = tmp_path / "project"
    sources = [shutil.copytree(a, root / "src" / Path(a).name) for a in causal.adapters]
    base = shutil.copytree(causal.base, root / "base")
    examples = root / "ex.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    args = ["-q", "search", "--base", base, "--examples", examples, *sources, "--steps", "4", "--device", "cpu"]
    args += ["--composition", composition, *(["--merge-into", base] if merge else []), "-o", root / "out"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load((root / "out" / "loramix_recipe.yaml").read_text())
    searched = json.loads((root / "out" / "search.json").read_text())["weights"]
    assert recipe["method"] == ("lorahub" if composition == "lorahub" else "cat")
    assert [a["weight"] for a in recipe["adapters"]] == searched
    assert [a["source"] for a in recipe["adapters"]] == [f"../src/{Path(s).name}" for s in sources]
    assert "searched weights" in (root / "out" / "README.md").read_text()
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)
    again = CliRunner().invoke(main, ["-q", "combine", "--recipe", str(moved / "out" / "loramix_recipe.yaml"),
                                      "-o", str(moved / "again")])  # fmt: skip
    assert again.exit_code == 0, again.output
    written = sorted(p.name for p in (moved / "out").glob("*.safetensors"))
    assert written
    for name in written:
        assert (moved / "again" / name).read_bytes() == (moved / "out" / name).read_bytes(), name


def test_entropy_objective_is_the_entropy_of_peft_predictions(causal, tmp_path):
    """AdaMerging's unlabeled objective: the mean entropy (float64, from PEFT's logits) of the next-token
    distribution at the output positions; the output text is context only (1e-4 relative, as TOL)."""
    w = [0.5, -1.0, 0.25]
    with causal.evaluator(EXAMPLES, "delta", objective="entropy") as ev:
        ours = float(ev.cross_entropy(torch.tensor([w]))[0])
    model = causal.delta_peft(w, tmp_path / "d")
    batch = build_batch(as_examples(EXAMPLES), causal.tokenizer, encoder_decoder=False)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    scored = batch["labels"][:, 1:] != -100
    expected = torch.distributions.Categorical(logits=logits[:, :-1]).entropy()[scored].mean()
    assert ours == pytest.approx(float(expected), rel=1e-4)


def test_entropy_search_with_a_layer_gradient(causal):
    """The entropy objective with CMA-ES and a weight that varies by layer: the result's score is the entropy at
    the weights found (not a cross-entropy), and it is recorded in the settings."""
    result = search(
        causal.base,
        causal.adapters,
        EXAMPLES,
        composition="delta",
        optimizer="cma",
        objective="entropy",
        steps=2,
        init=[[0.0, 0.0], 0.0, 0.0],
        device="cpu",
    )
    assert result.settings["objective"] == "entropy"
    theta = [*result.weights[0], result.weights[1], result.weights[2]]
    with causal.evaluator(EXAMPLES, "delta", objective="entropy", forms=[[0.0, 0.0], 0.0, 0.0]) as ev:
        assert result.cross_entropy == pytest.approx(float(ev.cross_entropy([theta])[0]), rel=1e-5)
    with pytest.raises(SearchError, match="unknown objective"):
        search(causal.base, causal.adapters, EXAMPLES, objective="likelihood", device="cpu")
