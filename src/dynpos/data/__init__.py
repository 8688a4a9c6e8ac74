"""Data: named corpora -> ``datasets``; tokenizers from ``tokenizers``; synthetic length-generalization
tasks; the LightningDataModules."""

from dynpos.data.corpora import CORPORA, SHAKESPEARE_HELD_OUT, HubUnavailableError, load_corpus, shakespeare_works
from dynpos.data.datamodule import TextDataModule
from dynpos.data.tasks import TASKS, TaskDataModule
from dynpos.data.tokenizer import (TOKENIZER_KINDS, build_tokenizer, load_tokenizer, save_tokenizer,
                                   tokenizer_fingerprint)

__all__ = ["CORPORA", "SHAKESPEARE_HELD_OUT", "TASKS", "TOKENIZER_KINDS", "HubUnavailableError", "TaskDataModule",
           "TextDataModule", "build_tokenizer", "load_corpus", "load_tokenizer", "save_tokenizer", "shakespeare_works",
           "tokenizer_fingerprint"]
