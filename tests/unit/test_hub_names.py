"""Model names: what each form means, and the malformed ones refused before any network call."""

import pytest

from inferd.hub.names import InvalidModelNameError, Origin, parse_model_name


@pytest.mark.parametrize(
    ("text", "origin", "repo", "revision", "file"),
    [
        ("BAAI/bge-small-en-v1.5", Origin.HUGGINGFACE, "BAAI/bge-small-en-v1.5", None, None),
        ("org/name@v1.0", Origin.HUGGINGFACE, "org/name", "v1.0", None),
        ("TheBloke/Llama-2-7B-GGUF:Q4_K_M", Origin.HUGGINGFACE, "TheBloke/Llama-2-7B-GGUF", None, "Q4_K_M"),
        ("org/m-GGUF@main:m.Q8_0.gguf", Origin.HUGGINGFACE, "org/m-GGUF", "main", "m.Q8_0.gguf"),
        ("modelscope:qwen/Qwen2-0.5B", Origin.MODELSCOPE, "qwen/Qwen2-0.5B", None, None),
        ("modelscope:qwen/Qwen2-0.5B@v1", Origin.MODELSCOPE, "qwen/Qwen2-0.5B", "v1", None),
        ("SmolLM2-135M-Instruct", Origin.BUNDLED, None, None, None),
    ],
)  # fmt: skip
def test_valid_names(text, origin, repo, revision, file):
    ref = parse_model_name(text)
    assert (ref.origin, ref.repo_id, ref.revision, ref.file) == (origin, repo, revision, file)
    assert ref.is_gguf is (file is not None)


def test_existing_paths_are_local(tmp_path):
    ref = parse_model_name(str(tmp_path))
    assert ref.origin is Origin.LOCAL and ref.path == tmp_path.resolve()
    assert parse_model_name("./not-there").origin is Origin.LOCAL


@pytest.mark.parametrize(
    "text",
    ["", "justaname", "a/b/c", "org/", "org//name", "-org/name", "org/na me", "org/na--me",
     "org/name@", "org/name:Q4 K", "modelscope:nope", "o" * 97 + "/x"],
)  # fmt: skip
def test_malformed_names_are_refused_with_the_forms_that_work(text):
    with pytest.raises(InvalidModelNameError) as caught:
        parse_model_name(text)
    assert caught.value.message
