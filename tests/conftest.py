import os


# Nothing in the tests downloads: models, tokenizers and videos are built by the tests, the Hub is a local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
