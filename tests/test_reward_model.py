"""A learned reward model as a reward (`rm:PATH`): scored on re-tokenised text, batched, labels."""
import pytest
import torch

import policygrad
from policygrad.lm.reward_model import RewardModel, scored_text
from policygrad.lm.rewards import build

PROMPTS = ["Review a film.", "Say hi.", "Describe the sea in one long sentence please.", "Go.", "Why?"]
COMPLETIONS = ["Great film, loved it.", "hi", "The sea is wide and grey and restless.", "", "Because it is."]


def make_classifier(path, num_labels: int = 1, seed: int = 0, chat_template: str = None):
    """A tiny random Llama sequence classifier whose tokenizer numbers the bytes in reverse order:
    the same text is other ids than in tests/lm_helpers.py's policy tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), reverse=True)
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    if chat_template:
        tokenizer.chat_template = chat_template
    labels = {} if num_labels == 1 else {"id2label": {i: n for i, n in enumerate(["neg", "neu", "pos"][:num_labels])}}
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, num_labels=num_labels, **labels)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_at_a_time(path, texts, add_special_tokens=True):
    """The naive twin: each text alone, no padding, the logits at its last token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        return [model(**tokenizer(t, return_tensors="pt", add_special_tokens=add_special_tokens)).logits[0]
                for t in texts]


@pytest.fixture(scope="module")
def scalar_rm(tmp_path_factory):
    return make_classifier(tmp_path_factory.mktemp("rm") / "scalar")


def test_batched_scores_equal_each_text_scored_alone(scalar_rm):
    """Padding in a batch changes nothing: batches of 2 over 5 texts of different lengths give
    the logit of each text scored on its own."""
    rm = RewardModel.load(f"rm:{scalar_rm}")
    rm.batch_size = 2
    got = rm(PROMPTS, COMPLETIONS)
    want = [x[0].item() for x in one_at_a_time(scalar_rm, [f"{p}\n{c}" for p, c in zip(PROMPTS, COMPLETIONS)])]
    assert got == pytest.approx(want, abs=1e-5)


def test_a_run_scores_its_decoded_completions_in_the_reward_models_own_vocabulary(scalar_rm, tmp_path, tiny_lm):
    """End to end: every held-out sample's reward is the reward model's score of that prompt and
    completion as text. Reading the policy's token ids in the reward model's vocabulary (the
    mistake) gives other scores."""
    rows = [{"prompt": f"Say something about item {i}."} for i in range(30)]
    result = policygrad.train(algo="reinforce", model=str(tiny_lm), data=rows, rewards=[f"rm:{scalar_rm}"],
                              max_new_tokens=6, total_steps=1, prompts_per_step=2, samples_per_prompt=2,
                              progress=False)
    samples = result.final.samples
    texts = [f"{s['prompt']}\n{s['completion']}" for s in samples]
    want = [x[0].item() for x in one_at_a_time(scalar_rm, texts)]
    assert [s["reward"] for s in samples] == pytest.approx(want, abs=1e-5)
    from transformers import AutoModelForSequenceClassification
    wrong_ids = result.tokenizer(texts[0], return_tensors="pt")  # the policy's ids, fed to the reward model
    with torch.no_grad():
        wrong = AutoModelForSequenceClassification.from_pretrained(scalar_rm)(**wrong_ids).logits[0, 0].item()
    assert abs(wrong - want[0]) > 1e-3


def test_a_chat_template_frames_the_prompt_and_reply(tmp_path):
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    path = make_classifier(tmp_path / "chat", chat_template=template)
    rm = RewardModel.load(f"rm:{path}")
    assert scored_text(rm.tokenizer, "Hi?", "Hello.") == "<user>Hi?<assistant>Hello."
    want = one_at_a_time(path, ["<user>Hi?<assistant>Hello."], add_special_tokens=False)[0][0].item()
    assert rm(["Hi?"], ["Hello."]) == pytest.approx([want], abs=1e-5)


def test_a_classifier_label_is_its_probability_and_must_be_named(tmp_path):
    path = make_classifier(tmp_path / "three", num_labels=3)
    logits = one_at_a_time(path, ["Review a film.\nGreat film, loved it."])[0]
    pos = build(f"rm:{path}#pos").fn(["Review a film."], ["Great film, loved it."], {})
    assert pos == pytest.approx([torch.softmax(logits, -1)[2].item()], abs=1e-6)
    with pytest.raises(policygrad.RewardError, match="pick one as rm:PATH#LABEL, one of neg, neu, pos"):
        build(f"rm:{path}")
    with pytest.raises(policygrad.RewardError, match="no label 'happy'"):
        build(f"rm:{path}#happy")


def test_a_reward_model_object_is_a_reward_and_a_bare_model_is_refused(scalar_rm):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(scalar_rm)
    tokenizer = AutoTokenizer.from_pretrained(scalar_rm)
    reward = build((policygrad.RewardModel(model, tokenizer, name="mine"), 0.5))
    assert reward.name == "mine" and reward.weight == 0.5
    assert reward.fn(PROMPTS[:2], COMPLETIONS[:2], {}) == pytest.approx(
        RewardModel.load(f"rm:{scalar_rm}")(PROMPTS[:2], COMPLETIONS[:2]), abs=1e-6)
    with pytest.raises(policygrad.RewardError, match="wrap a sequence-classification model"):
        build(model)


def test_reward_normalize_standardises_with_the_saved_statistics(tmp_path):
    import json
    path = make_classifier(tmp_path / "stats")
    raw = RewardModel.load(f"rm:{path}")(PROMPTS, COMPLETIONS)
    with pytest.raises(policygrad.RewardError, match="needs the mean and std"):
        RewardModel.load(f"rm:{path}").normalize(True)
    (path / "reward_stats.json").write_text(json.dumps({"mean": 0.25, "std": 2.0, "n": 10}))
    rewards = policygrad.RewardSet([build(f"rm:{path}")])
    rewards.configure(timeout=30, retries=0, normalize=True)
    got = rewards(PROMPTS, COMPLETIONS, {})
    assert got.tolist() == pytest.approx([(x - 0.25) / 2.0 for x in raw], abs=1e-6)
    labelled = make_classifier(tmp_path / "three", num_labels=3)
    (labelled / "reward_stats.json").write_text(json.dumps({"mean": 0.25, "std": 2.0, "n": 10}))
    with pytest.raises(policygrad.RewardError, match="is a label's probability"):
        RewardModel.load(f"rm:{labelled}#pos").normalize(True)
    with pytest.raises(policygrad.RewardError, match="include none"):
        policygrad.RewardSet([build("vader")]).configure(timeout=30, retries=0, normalize=True)


def test_the_saved_truncation_cuts_long_texts_and_an_older_folder_reads_them_whole(tmp_path):
    """reward_stats.json's truncation (from `policygrad rm`, #23) cuts the scored text to max_length
    tokens on its side (one token per byte here); a folder without one, or with stats from before
    it was saved, reads the text whole."""
    import json
    path = make_classifier(tmp_path / "cut")
    text = f"{PROMPTS[2]}\n{COMPLETIONS[2]}"
    score = lambda: RewardModel.load(f"rm:{path}")([PROMPTS[2]], [COMPLETIONS[2]])  # noqa: E731
    whole = [one_at_a_time(path, [text])[0][0].item()]
    assert score() == pytest.approx(whole, abs=1e-6)
    (path / "reward_stats.json").write_text(json.dumps({"mean": 0.25, "std": 2.0, "n": 10}))
    assert score() == pytest.approx(whole, abs=1e-6)
    for side, kept in (("right", text[:8]), ("left", text[-8:])):
        (path / "reward_stats.json").write_text(json.dumps({"mean": 0.25, "std": 2.0, "n": 10,
                                                            "truncation": {"max_length": 8, "side": side}}))
        assert score() == pytest.approx([one_at_a_time(path, [kept])[0][0].item()], abs=1e-6)
        assert score() != pytest.approx(whole, abs=1e-3)
    (path / "reward_stats.json").write_text(json.dumps({"truncation": {"max_length": 8, "side": "middle"}}))
    with pytest.raises(policygrad.RewardError, match="bad truncation"):
        score()


def test_a_zero_weight_reward_is_watched_beside_the_one_trained_on(scalar_rm, tmp_path, tiny_lm):
    """rm: as the only trained reward and VADER at weight 0: the run's reward is the proxy's, and the
    gold rule's mean is logged beside it on every evaluation and training step."""
    import json

    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    rows = [{"prompt": f"Say something about item {i}."} for i in range(30)]
    spec = f"rm:{scalar_rm}"
    result = policygrad.train(algo="reinforce", model=str(tiny_lm), data=rows, rewards=[spec, ("vader", 0.0)],
                              max_new_tokens=6, total_steps=2, prompts_per_step=2, samples_per_prompt=2,
                              eval_every=1, eval_prompts=4, out=tmp_path / "watch", progress=False)
    assert {f"eval/reward/{spec}", "eval/reward/vader", f"train/reward/{spec}", "train/reward/vader"} <= \
        set(result.history[0])
    assert result.history[0]["eval/reward_mean"] == pytest.approx(result.history[0][f"eval/reward/{spec}"])
    analyzer = SentimentIntensityAnalyzer()
    samples = result.final.samples
    gold = [analyzer.polarity_scores(s["completion"])["compound"] for s in samples]
    final = json.loads((tmp_path / "watch" / "final_eval.json").read_text())
    assert final["test/reward/vader"] == pytest.approx(sum(gold) / len(gold))
    assert final["test/reward_mean"] == pytest.approx(final[f"test/reward/{spec}"])
