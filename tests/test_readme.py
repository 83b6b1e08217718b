"""The README's two commands are the ones CI and users run: keep them true."""

from tests.helpers import REPO


def _bash_blocks(text: str) -> list[str]:
    blocks, inside = [], False
    for line in text.splitlines():
        if line.startswith("```bash"):
            inside, current = True, []
        elif line.startswith("```") and inside:
            inside = False
            blocks.append("\n".join(current))
        elif inside:
            current.append(line)
    return blocks


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    demo, tests = _bash_blocks(readme)[:2]  # the README opens with the two commands, demo first
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert tests.strip() == ci_command
    assert "pytest" in tests and "scripts/demo.py" in demo
    assert (REPO / "scripts" / "demo.py").is_file()


def test_readme_says_where_models_come_from_and_where_paths_resolve():
    readme = " ".join((REPO / "README.md").read_text().split())
    assert "Nothing is downloaded at run time" in readme and "local Hugging Face cache" in readme
    assert "`hf download`" in readme and "huggingface-cli" not in readme  # huggingface_hub >= 1.0 has only `hf`
    assert "model: path: meta-llama/Meta-Llama-3-8B # org/name: read from the local cache" in readme
    assert "Relative paths in a config file (`model.path`, `data.path`, `data.eval_path`, `out`) are relative to " \
           "the config file's folder" in readme
    assert "relative paths in `key=value` overrides are relative to the current folder" in readme
    assert "`OUT/config.yaml` with absolute paths" in readme


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end, text.index(start))]


def test_the_gpt2_example_says_it_is_under_trained():
    """The README's GPT-2 commands end in a generate call that answers wrongly: the README and the config say so,
    with the config's own step count, so a reader does not take the wrong answer for a bug."""
    import yaml

    section = _section((REPO / "README.md").read_text(), "## GPT-2 models and classifiers", "A classifier is")
    assert 'generate --base assets/tiny-gpt2 --adapter runs/tiny-gpt2/adapter --prompt "reverse: c a t ="' in section
    config_file = REPO / "configs" / "tiny-gpt2.yaml"
    comment = " ".join(line.lstrip("# ") for line in config_file.read_text().splitlines() if line.startswith("#"))
    steps = yaml.safe_load(config_file.read_text())["train"]["max_steps"]
    for text in (" ".join(section.split()), comment):
        assert "under-trained" in text.lower() and f"{steps} steps" in text
        assert "not a model that reverses letters" in text and "k q q" in text and "t a c" in text
