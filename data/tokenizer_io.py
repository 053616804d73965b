"""Which tokenizer a folder holds: load a run folder's, write one as Hugging Face files.

The tokenizer interface (data/tokenizer.py) knows none of its backends; this module is the one
place that chooses between them, so the backends import the interface and never the reverse.
"""
import os

from data import hf_export, hf_tokenizer
from data import tokenizer as tok
from data.errors import DataError


def load_run_tokenizer(workdir: str):
    """The tokenizer a run folder holds: its tokenizer.model, else its hf_tokenizer/ folder."""
    if os.path.exists(os.path.join(workdir, tok.MODEL_FILE)):
        return tok.load_tokenizer(os.path.join(workdir, tok.MODEL_FILE))
    if os.path.isdir(os.path.join(workdir, tok.HF_DIR)):
        return hf_tokenizer.load_hf_tokenizer(os.path.join(workdir, tok.HF_DIR))
    raise DataError(
        f"{workdir} holds no tokenizer (neither {tok.MODEL_FILE} nor {tok.HF_DIR}/); train the "
        "run first (it writes one), or point to the run folder that has it"
    )


def export_hf(tokenizer, directory: str, model_family: str) -> None:
    """Writes `tokenizer` into directory as a Hugging Face tokenizer: a folder's tokenizer as
    the files it was read from, our SentencePiece model rebuilt (data/hf_export.py)."""
    if isinstance(tokenizer, tok.Tokenizer):
        special = {name: getattr(tokenizer, f"{name}_id") for name in tok.SPECIAL_NAMES}
        # A Llama-family decoder reads its prompts as GPT does (bos, then the text).
        family = "gpt" if model_family == "llama" else model_family
        hf_export.export_sentencepiece(tokenizer.model_proto, special, directory, family)
    elif hasattr(tokenizer, "export_hf"):
        tokenizer.export_hf(directory, model_family)
    else:
        raise DataError(f"the tokenizer in {tokenizer.path} cannot be written as Hugging Face "
                        "files")
