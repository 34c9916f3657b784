"""The method table of README.md and the method list of docs/bad_inputs.md come from the method
registry (scripts/generated_docs.py), and are current."""
import importlib.util
from pathlib import Path

import pytest

from certkd.methods import Method, base, method_names, register_method

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("certkd_generated_docs", ROOT / "scripts" / "generated_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_sections_are_current():
    docs = _script()
    assert docs.stale() == [], (f"{', '.join(docs.stale())} out of date with the method registry: "
                                "run python scripts/generated_docs.py")
    for f in docs.FILES:  # each file has its section, so the check above is not empty
        assert "<!-- generated: method-" in (ROOT / f).read_text(), f


def test_every_method_has_a_summary_citing_the_method_document():
    from certkd.methods import method_class

    for name in method_names():
        summary = method_class(name).summary
        assert summary and "docs/method.md" in summary and "|" not in summary, (name, summary)


def test_a_new_method_appears_in_both_sections():
    docs = _script()
    text = ("x\n" + docs.mark("method-table", "old") + "\nchoose one of: " + docs.mark("method-names", "a, b") + ".")

    @register_method("test-new")
    class New(Method):
        category = "distillation"
        order = 999
        summary = "a test method (docs/method.md §7)"

    try:
        filled = docs.fill(text)
    finally:
        base._REGISTRY.pop("test-new", None)
    assert "| `test-new` | distillation | a test method (docs/method.md §7) |" in filled
    assert ", test-new<!-- end generated: method-names -->." in filled and "old" not in filled
    assert docs.fill(filled) != filled  # without the class, the sections change back
    with pytest.raises(SystemExit, match="unknown generated section 'nope'"):
        docs.fill(docs.mark("nope", ""))
