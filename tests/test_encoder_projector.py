"""The encoder-projector family (frozen Whisper + projector + LoRA'd LLM) on tiny random-init parts, offline."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from soda.audio_llm import IGNORE, Collate, EncoderProjectorConfig, EncoderProjectorModel, load, merge
from tests.conftest import REPO

pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

@pytest.fixture(scope="module")
def audio_qa(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_audio_qa", REPO / "demo" / "make_audio_qa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.make_set(tmp_path_factory.mktemp("qa"), items=3, test_items=1, seed=0, speech=False)
    from soda.finetune.instruct_data import read_items

    items, _, _ = read_items([str(out / "instruct.jsonl")])
    return items


def _config(parts, **kwargs):
    return EncoderProjectorConfig(encoder=str(parts / "whisper-random"), llm=str(parts / "llm-random"), **kwargs)


def _model(parts, seed=0, **kwargs):
    torch.manual_seed(seed)
    return EncoderProjectorModel(_config(parts, **kwargs))


def _collate(model):
    return Collate(model.tokenizer, model.feature_extractor, model.config)


def _train(model, batch, steps, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_only_lora_and_projector_train_and_the_frozen_weights_do_not_move(parts, audio_qa):
    model = _model(parts, lora_dropout=0.0)
    batch = _collate(model)(audio_qa[:2])
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "projector" not in k}
    model.train()
    assert not model.encoder.training and model.llm.training
    loss = model(**batch).loss
    cached = model(**{k: v for k, v in batch.items() if k != "input_features"},
                   encoder_states=model.encode(batch["input_features"])).loss
    assert torch.equal(loss, cached)
    loss.backward()
    for name, p in model.named_parameters():
        trains = "lora_" in name or name.startswith("projector.")
        assert p.requires_grad == trains, name
        assert (p.grad is not None) == trains, name
    assert any("lora_B" in n and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.grad is not None)
    counts = model.parameter_counts()
    assert 0 < counts["trainable"] < counts["total"]
    _train(model, batch, 3)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # encoder and base LLM bit-identical


@pytest.mark.parametrize("pooling", ["stack", "mean"])
def test_the_placeholder_becomes_frames_over_two_embeddings_and_only_the_response_is_scored(parts, pooling):
    model = _model(parts, pooling=pooling)
    assert model.projector.in_features == (64 if pooling == "stack" else 32)  # 2 frames of d_model 32 side by side
    collate = _collate(model)
    rng = np.random.default_rng(0)
    long_clip, short_clip = rng.normal(0, 0.1, 30 * 16000), rng.normal(0, 0.1, 2 * 16000)
    items = [{"audio": None, "instruction": "Count the beeps.", "response": "three"},
             {"audio": None, "instruction": "Say it.", "response": "higher"}]
    batch = collate(items, waves=[long_clip.astype(np.float32), short_clip.astype(np.float32)])
    # 30 s -> 3000 mel frames -> 1500 encoder frames -> 750; 2 s -> 200 -> 100 -> 50 (the padding is cut)
    assert batch["audio_lengths"].tolist() == [750, 50]
    assert ((batch["input_ids"] == collate.audio_token_id).sum(1)).tolist() == [750, 50]
    ids, labels = batch["input_ids"], batch["labels"]
    for row, response in zip(range(2), ("three", "higher")):
        scored = ids[row][labels[row] != IGNORE].tolist()
        assert model.tokenizer.decode(scored) == response + "<|im_end|>\n"
        assert (labels[row][ids[row] == collate.audio_token_id] == IGNORE).all()
    embeds = model.input_embeddings(ids, batch["input_features"], batch["audio_lengths"])
    audio = model.audio_embeddings(batch["input_features"])
    assert audio.shape[1] == 750
    assert torch.equal(embeds[0][ids[0] == collate.audio_token_id], audio[0])
    assert torch.equal(embeds[1][ids[1] == collate.audio_token_id], audio[1, :50])
    text = ids[1] != collate.audio_token_id
    assert torch.equal(embeds[1][text], model.llm.get_input_embeddings()(ids[1][text]))
    untrimmed = Collate(model.tokenizer, model.feature_extractor, _config(parts, trim=False))
    assert untrimmed(items, waves=[long_clip, short_clip])["audio_lengths"].tolist() == [750, 750]
    too_long = rng.normal(0, 0.1, 40 * 16000).astype(np.float32)  # cut at Whisper's 30 s window
    assert collate(items[:1], waves=[too_long])["audio_lengths"].tolist() == [750]


def test_overfits_a_handful_of_synthetic_items_through_the_audio(parts, audio_qa):
    # LoRA on the MLPs too: a random 2-layer LLM fits through attention alone far more slowly than a pretrained one
    model = _model(parts, lora_dropout=0.0, lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]).train()
    batch = _collate(model)(audio_qa)
    states = model.encode(batch.pop("input_features"))  # frozen: encoded once, as a clip reused by many items can be
    losses = _train(model, {**batch, "encoder_states": states}, 80, lr=3e-3)
    assert losses[-1] < 0.5 and losses[-1] < 0.1 * losses[0], losses
    model.eval()
    answers = model.generate(audio_qa, max_new_tokens=8)
    # items of one kind share their instruction ("Count the beeps."): different answers can only come from the audio
    assert len({it.instruction for it in audio_qa}) == 2 and len({it.response for it in audio_qa}) > 2
    assert answers == [it.response for it in audio_qa]
    assert answers == [model.generate([it], max_new_tokens=8)[0] for it in audio_qa]  # left padding is exact


def test_save_load_and_merge_give_the_same_logits(parts, audio_qa, tmp_path):
    model = _model(parts, lora_dropout=0.0).train()
    batch = _collate(model)(audio_qa[:3])
    _train(model, batch, 3)
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    fresh = _model(parts, seed=1, lora_dropout=0.0).eval()
    fresh.load_trainable_state(model.trainable_state_dict())  # a training checkpoint: projector + LoRA only
    assert all("lora_" in k or k.startswith("projector.") for k in model.trainable_state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, logits)
    model.save_pretrained(tmp_path / "export")
    config = json.loads((tmp_path / "export" / "audio_llm.json").read_text())
    assert config["encoder"] == str(parts / "whisper-random") and config["llm"] == str(parts / "llm-random")
    reloaded = load(tmp_path / "export")
    assert not any(p.requires_grad for p in reloaded.parameters())
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, logits)
    scores = reloaded.response_log_probs(audio_qa[:3])
    assert [len(s) for s in scores] == [int((row != IGNORE).sum()) for row in batch["labels"]]
    one = reloaded.response_log_probs(audio_qa[1:2])[0]
    np.testing.assert_allclose(scores[1], one, atol=1e-5)  # right padding does not change a row
    with torch.no_grad():
        loss = reloaded(**batch).loss.item()
    assert abs(-np.concatenate(scores).mean() - loss) < 1e-5  # the same tokens the training loss scores
    merge(tmp_path / "export", tmp_path / "merged")
    assert (tmp_path / "merged" / "llm" / "config.json").is_file()
    assert not (tmp_path / "merged" / "adapter").exists()
    merged = load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, logits, atol=1e-5, rtol=1e-5)


def test_config_round_trips_and_bad_settings_are_one_line_errors(parts, tmp_path):
    from tokenize_audio.errors import SodaError

    config = _config(parts, pooling="mean", lora_r=4)
    assert EncoderProjectorConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    with pytest.raises(SodaError, match="pooling 'max'"):
        _config(parts, pooling="max")
    with pytest.raises(SodaError, match=r"--encoder \./nowhere: no such directory"):
        EncoderProjectorModel(EncoderProjectorConfig(encoder="./nowhere", llm=str(parts / "llm-random")))
    with pytest.raises(SodaError, match="--lora-targets nope: .*not found"):
        EncoderProjectorModel(_config(parts, lora_targets=["nope"]))
    plain = tmp_path / "plain"
    import shutil

    shutil.copytree(parts / "llm-random", plain)
    config_file = plain / "tokenizer_config.json"
    data = json.loads(config_file.read_text())
    data.pop("chat_template", None)
    config_file.write_text(json.dumps(data))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SodaError, match="no chat template"):
        EncoderProjectorModel(_config(parts).__class__(encoder=str(parts / "whisper-random"), llm=str(plain)))


def test_log_mel_features_equal_whisper_s_extractor_bit_for_bit():
    """`log_mel` skips the STFT of the padding after the longest clip; what it gives is the extractor's output."""
    from transformers import WhisperFeatureExtractor

    from soda.audio_llm import log_mel

    extractor = WhisperFeatureExtractor(feature_size=80)
    rng = np.random.default_rng(0)
    for sizes in ([32000, 16000, 12345], [480000], [600000, 100], [1], [1120, 399], [479900, 3000]):
        waves = [rng.normal(0, 0.1, n).astype(np.float32) for n in sizes]
        waves[0][: len(waves[0]) // 2] = 0  # silence inside a clip is not padding
        ref = extractor(waves, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
        got = log_mel(extractor, waves)
        assert torch.equal(got["input_features"], ref["input_features"]), sizes
        assert torch.equal(got["attention_mask"], ref["attention_mask"].to(got["attention_mask"].dtype)), sizes
