"""
What lets transformers' Auto classes find Otter's classes in a saved folder without `import otter` first.

An Otter folder names its classes in `auto_map` (config.json, processor_config.json), pointing at `otter_auto.py`
beside them: a module that holds no model code, only imports the classes from the installed `otter` package. So a bare
`AutoProcessor.from_pretrained(folder)` fails loudly (transformers asks for `trust_remote_code=True`) instead of
silently returning the tokenizer alone, and with `trust_remote_code=True` it loads Otter's classes from the package,
or says to install it. After `import otter` the registered classes are used and `auto_map` is not needed.
"""

from pathlib import Path

MODULE = "otter_auto"
CONFIG_AUTO_MAP = {
    "AutoConfig": f"{MODULE}.OtterConfig",
    "AutoModel": f"{MODULE}.OtterModel",
    "AutoModelForCausalLM": f"{MODULE}.OtterForConditionalGeneration",
    "AutoModelForImageTextToText": f"{MODULE}.OtterForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": f"{MODULE}.OtterProcessor"}

SOURCE = '''"""
This folder holds an Otter model (Flamingo-style, https://pypi.org/project/otter-flamingo/). Its classes come from
the installed `otter` package, not from this file: `import otter` before loading the folder with transformers' Auto
classes, or pass trust_remote_code=True, which runs this file, and it only imports them from the package.
"""

try:
    from otter import OtterConfig, OtterForConditionalGeneration, OtterModel, OtterProcessor  # noqa: F401
except ImportError as error:
    raise ImportError("this folder holds an Otter model: install Otter (pip install otter-flamingo) and "
                      "`import otter` before loading it") from error
'''


def write_module(folder) -> None:
    """Writes `otter_auto.py` into `folder` (the same text every time)."""
    (Path(folder) / f"{MODULE}.py").write_text(SOURCE, encoding="utf-8")
