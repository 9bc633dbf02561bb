"""transformers' own Auto classes refuse ``tome_*`` keywords with an error that points at hf_tome's Auto classes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import make_model

import hf_tome
from hf_tome.integration import plain_transformers

AUTO_MODEL_ERROR = ("transformers.AutoModel.from_pretrained() does not take tome_r: transformers would pass it on to "
                    "the model's __init__. Load with hf_tome's Auto class instead: hf_tome.AutoModel.from_pretrained("
                    "..., tome_r=16), or load without tome_r and call hf_tome.apply(model, r=16)")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-vit")
    make_model("vit-cls").save_pretrained(folder)
    return folder


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


CHECKS = """
import json, sys
import transformers

def error(call):
    try:
        call()
    except TypeError as exc:
        return str(exc)
    return None

finders = [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "_AutoFactoryFinder"]
result = {{
    "auto_model": error(lambda: transformers.AutoModel.from_pretrained({path!r}, tome_r=16)),
    "image": error(lambda: transformers.AutoModelForImageClassification.from_pretrained({path!r}, tome_r=8,
                                                                                        tome_prop_attn=False)),
    "plain": type(transformers.AutoModelForImageClassification.from_pretrained({path!r})).__name__,
    "hf_tome": hf_tome.AutoModelForImageClassification.from_pretrained({path!r}, tome_r=2).config.tome["r"],
    "finders_left": len([f for f in sys.meta_path if type(f).__name__ == "_AutoFactoryFinder"]),
}}
print(json.dumps(result))
"""


def _expect_checked(result: dict) -> None:
    assert result["auto_model"] == AUTO_MODEL_ERROR
    assert result["image"] == (
        "transformers.AutoModelForImageClassification.from_pretrained() does not take tome_r, tome_prop_attn: "
        "transformers would pass them on to the model's __init__. Load with hf_tome's Auto class instead: "
        "hf_tome.AutoModelForImageClassification.from_pretrained(..., tome_r=8, tome_prop_attn=False), or load "
        "without tome_r, tome_prop_attn and call hf_tome.apply(model, r=8, prop_attn=False)")
    assert result["plain"] == "ViTForImageClassification"  # no tome_* keywords: transformers' own load
    assert result["hf_tome"] == 2  # hf_tome's Auto classes take the keywords out before calling transformers
    assert result["finders_left"] == 0  # the finder removed itself once it had wrapped auto_factory


@pytest.mark.slow
def test_hf_tome_imported_first(vit_dir):
    code = "import sys\nimport hf_tome\n" \
           "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n" \
           "assert sum(type(f).__name__ == '_AutoFactoryFinder' for f in sys.meta_path) == 1\n"
    _expect_checked(_run(code + CHECKS.format(path=str(vit_dir))))


@pytest.mark.slow
@pytest.mark.parametrize("before", [
    "import transformers.models.auto.auto_factory",  # the factory, but no Auto class made yet
    "import transformers\ntransformers.AutoModel, transformers.AutoModelForImageClassification",  # the classes too
])
def test_transformers_auto_imported_first(vit_dir, before):
    code = f"{before}\nimport hf_tome\n"
    _expect_checked(_run(code + CHECKS.format(path=str(vit_dir))))


def test_in_this_process(vit_dir):
    with pytest.raises(TypeError) as error:
        transformers.AutoModel.from_pretrained(vit_dir, tome_r=16)
    assert str(error.value) == AUTO_MODEL_ERROR
    with pytest.raises(TypeError, match=r"hf_tome.AutoModelForImageClassification.from_config\(\.\.\., tome_r=4\)"):
        transformers.AutoModelForImageClassification.from_config(transformers.ViTConfig(), tome_r=4)


def test_calls_without_tome_keywords_reach_transformers_unchanged(vit_dir):
    model = transformers.AutoModelForImageClassification.from_pretrained(vit_dir, output_attentions=True)
    reference = transformers.ViTForImageClassification.from_pretrained(vit_dir)
    assert type(model) is transformers.ViTForImageClassification and model.config.output_attentions is True
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    config = transformers.AutoConfig.from_pretrained(vit_dir)
    built = transformers.AutoModel.from_config(config, attn_implementation="eager")
    assert type(built) is transformers.ViTModel and built.config._attn_implementation == "eager"
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_tome_keyword'"):
        transformers.AutoModel.from_pretrained(vit_dir, not_a_tome_keyword=1)  # transformers' own error, as before


def test_hf_tome_auto_classes_take_tome_keywords(vit_dir):
    model = hf_tome.AutoModel.from_pretrained(vit_dir, tome_r=3, tome_prop_attn=False)
    assert hf_tome.is_patched(model) and (model.config.tome["r"], model.config.tome["prop_attn"]) == (3, False)
    built = hf_tome.AutoModelForImageClassification.from_config(transformers.AutoConfig.from_pretrained(vit_dir),
                                                                tome_r=5)
    assert built.config.tome["r"] == 5


def test_wrapping_twice_changes_nothing():
    from transformers.models.auto import auto_factory

    methods = {cls: cls.__dict__["from_pretrained"] for cls in (auto_factory._BaseAutoModelClass,
                                                              transformers.AutoModel)}
    plain_transformers.install()
    plain_transformers.check_auto_classes(auto_factory)
    assert all(cls.__dict__["from_pretrained"] is method for cls, method in methods.items())


def test_error_for_an_auto_class_hf_tome_does_not_have():
    error = plain_transformers.tome_keyword_error("AutoModelForObjectDetection", "from_pretrained",
                                                  {"revision": "main", "tome_r": 16})
    assert isinstance(error, TypeError) and str(error) == (
        "transformers.AutoModelForObjectDetection.from_pretrained() does not take tome_r: transformers would pass "
        "it on to the model's __init__. hf_tome has no AutoModelForObjectDetection: load without tome_r and call "
        "hf_tome.apply(model, r=16)")
    config = plain_transformers.tome_keyword_error("AutoModel", "from_pretrained", {"tome_config": {"r": 4}})
    assert "hf_tome.AutoModel.from_pretrained(..., tome_config={'r': 4})" in str(config)
    assert "hf_tome.apply(model, {'r': 4})" in str(config)
