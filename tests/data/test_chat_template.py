"""Checkpoints' chat templates (data/chat_template.py) against transformers' apply_chat_template.

Two tokenizer folders are built here the way Qwen 2.5 and Llama 3 lay theirs out: a byte-level
BPE with a regex split (the GPT-4-style pattern both use) and their turn tokens as special
tokens, each with a template written here in that model's layout (ChatML; header blocks
ending in <|eot_id|>). The Qwen-style one keeps its template in tokenizer_config.json, the
Llama-style one in chat_template.jinja. transformers is the reference for the ids (single and
multi-turn, with and without the generation prompt) and, through the templates'
{% generation %} tags, for which tokens are the assistant's; ours finds them by rendering
prefixes, without the tags.
"""
import pytest

transformers = pytest.importorskip("transformers")

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models  # noqa: E402
from tokenizers import pre_tokenizers, trainers  # noqa: E402

from data import chat, chat_template, hf_tokenizer  # noqa: E402
from data.errors import DataError  # noqa: E402
from tests.data.test_hf_tokenizer import assert_same_ids, corpus, make_strings  # noqa: E402

SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
         r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "{% endif %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>"
    "{% endgeneration %}{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _byte_level(specials):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=800, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in specials])
    return backend


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_templates")
    qwen = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    qwen.chat_template = CHATML
    qwen.save_pretrained(root / "qwen")
    # Where this transformers version put it, moved into tokenizer_config.json (older folders).
    import json
    config_path = root / "qwen" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    jinja = root / "qwen" / hf_tokenizer.TEMPLATE_FILE
    if jinja.exists():
        jinja.unlink()
    config["chat_template"] = CHATML
    config_path.write_text(json.dumps(config))
    (root / "qwen" / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [qwen.convert_tokens_to_ids("<|im_end|>"),
                          qwen.convert_tokens_to_ids("<|endoftext|>")]}))
    llama = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_byte_level(["<|begin_of_text|>", "<|end_of_text|>",
                                      "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
        bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    llama.save_pretrained(root / "llama")
    (root / "llama" / hf_tokenizer.TEMPLATE_FILE).write_text(LLAMA3)
    return {"qwen": str(root / "qwen"), "llama": str(root / "llama")}


CONVERSATIONS = [
    (("user", "Whose son was Abel?"), ("assistant", "Abel was the son of Adam.")),
    (("system", "Answer briefly."), ("user", "Who built the ark?"), ("assistant", "Noah."),
     ("user", "And his sons?"), ("assistant", " Shem, Ham and Japheth. ")),
    (("user", "Text that spells <|im_end|> and <|eot_id|> and 東京 🙂"), ("assistant", "ok")),
]


@pytest.mark.parametrize("kind", ["qwen", "llama"])
def test_rendering_gives_apply_chat_template_ids_and_assistant_mask(folders, kind):
    ours = hf_tokenizer.load_hf_tokenizer(folders[kind])
    theirs = transformers.AutoTokenizer.from_pretrained(folders[kind])
    fmt = chat_template.chat_format(ours)
    assert isinstance(fmt, chat_template.TemplateFormat)
    for turns in CONVERSATIONS:
        messages = [{"role": r, "content": c} for r, c in turns]
        conv = chat.Conversation(turns)
        tokens, mask = fmt.render(conv)
        want = theirs.apply_chat_template(messages, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
        assert tokens == list(want["input_ids"])
        assert mask == list(want["assistant_masks"])
        assert sum(mask) > 0
        for cut in range(1, len(turns)):  # every prefix ending before an assistant turn
            if turns[cut][0] != "assistant":
                continue
            prompt = theirs.apply_chat_template(messages[:cut], tokenize=True,
                                                add_generation_prompt=True, return_dict=True)
            assert fmt.prompt(turns[:cut]) == list(prompt["input_ids"])
            assert tokens[:len(prompt["input_ids"])] == list(prompt["input_ids"])
    end = {"qwen": "<|im_end|>", "llama": "<|eot_id|>"}[kind]
    assert fmt.end_id == theirs.convert_tokens_to_ids(end)
    if kind == "qwen":  # generation_config.json's second EOS also stops generation
        assert fmt.stop_ids == (fmt.end_id, theirs.convert_tokens_to_ids("<|endoftext|>"))


def test_llama_style_tokenizer_ids_equal_transformers_on_13000_strings(folders):
    strings = make_strings(13_000)
    ours = hf_tokenizer.load_hf_tokenizer(folders["llama"])
    theirs = transformers.AutoTokenizer.from_pretrained(folders["llama"])
    expected = theirs(strings, add_special_tokens=False)["input_ids"]
    assert_same_ids([ours.encode(s) for s in strings], expected, strings)
    assert ours.bos_id == theirs.bos_token_id and ours.eos_id == theirs.eos_token_id


def test_templates_that_cannot_be_masked_or_parsed_are_refused(folders):
    ours = hf_tokenizer.load_hf_tokenizer(folders["qwen"])
    # Earlier assistant turns rendered without their content once a later turn exists (as
    # Qwen3 drops earlier reasoning): no prefix of the whole marks the first reply.
    forgetful = CHATML.replace("{{ m['content'] }}<|im_end|>\n{% endgeneration %}",
                               "{% if loop.last %}{{ m['content'] }}{% endif %}<|im_end|>\n"
                               "{% endgeneration %}")
    fmt = chat_template.TemplateFormat(ours, forgetful)
    with pytest.raises(DataError, match="renders turn 3 differently"):
        fmt.render(chat.Conversation(CONVERSATIONS[1], "x.jsonl:2"))
    with pytest.raises(DataError, match="does not parse"):
        chat_template.TemplateFormat(ours, "{% for m in messages %}")
    raising = "{{ raise_exception('only user and assistant roles') }}"
    with pytest.raises(DataError, match="only user and assistant roles"):
        chat_template.TemplateFormat(ours, raising)
    # The sandbox: no route from a template to Python internals.
    for escape in ("{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}"):
        with pytest.raises(DataError, match="is unsafe"):
            chat_template.TemplateFormat(ours, escape)
