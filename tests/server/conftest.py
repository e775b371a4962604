from tests.engine_fixtures import smol_tokenizer, store_engine, tiny_chat_model  # noqa: F401 (fixtures)
