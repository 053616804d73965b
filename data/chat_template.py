"""The chat format of a run (`chat_format`): a checkpoint's own Jinja chat template, rendered in a
sandbox as transformers' apply_chat_template renders it, with the loss mask on exactly the
assistant's turns; or, for a tokenizer without one, data/chat.py's chat tokens.

Instruct checkpoints (Llama 3, Qwen 2.5 / 3, Mistral, Gemma) were fine-tuned on conversations
laid out by the template in their tokenizer_config.json (or chat_template.jinja): role headers,
turn delimiters (<|im_start|> / <|im_end|>, <|start_header_id|> / <|eot_id|>, ...). Fine-tuning
or sampling them in any other layout throws that training away, so a run whose tokenizer has a
template uses it instead of data/chat.py's chat tokens. The rendered text is tokenized with the
special tokens matched (what apply_chat_template does), so the ids are transformers'.

The template renders whole conversations; which tokens are the assistant's is found by
rendering prefixes: for assistant turn i, the text up to the generation prompt after turns
< i, and the text through turn i, must both be prefixes of the whole rendering; the tokens
starting between the two carry loss (the reply and its end-of-turn token). A template that
renders earlier turns differently once later ones exist (Qwen3 drops the reasoning of earlier
turns) fails that check and is refused with the reason, rather than masked wrongly.
"""
import datetime
import json

import jinja2
import tokenizers
from jinja2 import ext, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data import chat
from data.errors import DataError


class _Generation(ext.Extension):
    """{% generation %}...{% endgeneration %} (transformers' assistant-mask tag) renders its
    body; the mask comes from prefixes here, so the tag needs no bookkeeping."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def compile_template(source: str) -> jinja2.Template:
    """The template compiled in an immutable sandbox (templates come with downloaded folders:
    no attribute access to Python internals, no mutation of the passed data), with the globals
    and filters published templates use."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, ext.loopcontrols])
    # json.dumps without HTML escaping (Jinja's own tojson escapes < > &, which changes text).
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the tokenizer's chat template does not parse (line {e.lineno}: "
                        f"{e.message}); fix tokenizer_config.json's chat_template") from None


class TemplateFormat:
    """Conversations rendered by a checkpoint's chat template (data/chat.py's chat format
    interface: render, prompt, end_id, stop_ids, show)."""

    def __init__(self, tokenizer, source: str):
        self.tokenizer = tokenizer
        self.template = compile_template(source)
        # The special tokens are matched in the rendered text, as transformers does (a run's
        # own tokenizer may be set never to match them in user text).
        self._backend = tokenizers.Tokenizer.from_str(tokenizer.backend_json())
        self._backend.encode_special_tokens = False
        self._names = {f"{name}_token": tokenizer.id_to_piece(getattr(tokenizer, f"{name}_id"))
                       for name in ("bos", "eos", "pad", "unk")
                       if getattr(tokenizer, f"{name}_id", None) is not None}
        self.end_id = self._end_of_turn()
        extra = [i for i in getattr(tokenizer, "stop_ids", ()) if i != self.end_id]
        self.stop_ids = (self.end_id, *extra)

    def text(self, turns, add_generation_prompt=False) -> str:
        messages = [{"role": role, "content": content} for role, content in turns]
        try:
            return self.template.render(messages=messages,
                                        add_generation_prompt=add_generation_prompt,
                                        **self._names)
        except jinja2.exceptions.TemplateError as e:
            raise DataError(f"the chat template refused a conversation: {e}") from None

    def _encode(self, text):
        return self._backend.encode(text, add_special_tokens=False)

    def _end_of_turn(self) -> int:
        """The token the template closes an assistant turn with: the first token after the
        reply's text (<|im_end|>, <|eot_id|>, <end_of_turn>), else EOS."""
        probe = "Abel"
        turns = (("user", "Who?"), ("assistant", probe))
        full = self.text(turns)
        start = self.text(turns[:1], add_generation_prompt=True)
        at = full.find(probe, len(start) if full.startswith(start) else 0)
        encoding = self._encode(full)
        after = [i for i, (s, _) in zip(encoding.ids, encoding.offsets) if s >= at + len(probe)]
        special = set(self.tokenizer.special_ids)
        if after and after[0] in special:
            return after[0]
        if self.tokenizer.eos_id is None:
            raise DataError("the chat template closes assistant turns with no special token and "
                            "the tokenizer has no EOS: generation would never stop")
        return self.tokenizer.eos_id

    def render(self, conv) -> tuple[list[int], list[int]]:
        """(tokens, loss_mask): mask 1 on the tokens of each assistant turn, from the end of
        its generation prompt to the end of the turn (its end-of-turn token included)."""
        turns = conv.turns
        full = self.text(turns)
        encoding = self._encode(full)
        spans = []
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before = self.text(turns[:i], add_generation_prompt=True)
            through = self.text(turns[:i + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise DataError(
                    f"{conv.where or 'a conversation'}: the chat template renders turn {i + 1} "
                    "differently once later turns follow, so the assistant's tokens cannot be "
                    "told from the prompt's; train on single-turn conversations with this "
                    "template")
            spans.append((len(before), len(through)))
        mask = [int(any(a <= s < b for a, b in spans)) for s, _ in encoding.offsets]
        return list(encoding.ids), mask

    def prompt(self, turns) -> list[int]:
        """The rendered turns and the generation prompt: what a reply continues from."""
        return list(self._encode(self.text(turns, add_generation_prompt=True)).ids)

    def show(self, conv) -> str:
        tokens, mask = self.render(conv)
        pieces = [("⟦" if m else "") + self.tokenizer.id_to_piece(i) + ("⟧" if m else "")
                  for i, m in zip(tokens, mask)]
        return (f"{self.text(conv.turns)}\npieces: {' '.join(pieces)}\n{len(tokens)} tokens, "
                f"{sum(mask)} carry loss (inside ⟦ ⟧); rendered by the checkpoint's chat template")


class TokenFormat:
    """Our chat format: data/chat.py's four chat tokens (render, prompt_tokens, show), as an
    object with TemplateFormat's interface."""

    def __init__(self, tokenizer, ids: dict[str, int]):
        self.tokenizer, self.ids = tokenizer, ids
        self.end_id = ids["end"]
        self.stop_ids = (self.end_id,)

    def render(self, conv):
        return chat.render(conv, self.tokenizer, self.ids)

    def prompt(self, turns):
        return chat.prompt_tokens(turns, self.tokenizer, self.ids)

    def show(self, conv):
        return chat.show(conv, self.tokenizer, self.ids)


def chat_format(tokenizer):
    """The run's chat format: the checkpoint's own template when its tokenizer has one, else
    our chat tokens (a DataError when the vocabulary lacks them)."""
    if chat.uses_template(tokenizer):
        return TemplateFormat(tokenizer, tokenizer.chat_template)
    return TokenFormat(tokenizer, chat.chat_token_ids(tokenizer))
