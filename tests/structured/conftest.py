from tests.engine_fixtures import smol_tokenizer, tiny_chat_model  # noqa: F401 (fixtures)
