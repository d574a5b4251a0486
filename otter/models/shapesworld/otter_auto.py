"""
This folder holds an Otter model (Flamingo-style, https://pypi.org/project/otter-flamingo/). Its classes come from
the installed `otter` package, not from this file: `import otter` before loading the folder with transformers' Auto
classes, or pass trust_remote_code=True, which runs this file, and it only imports them from the package.
"""

try:
    from otter import OtterConfig, OtterForConditionalGeneration, OtterModel, OtterProcessor  # noqa: F401
except ImportError as error:
    raise ImportError("this folder holds an Otter model: install Otter (pip install otter-flamingo) and "
                      "`import otter` before loading it") from error
