"""Fine-tuning and scoring of exported checkpoints with Hugging Face `transformers`.

`bert-finetune` (cli.py) fine-tunes an export with transformers' own
`AutoModelForSequenceClassification` / `AutoModelForTokenClassification`, so what it measures
is what a user gets from the export in their own code. Modules:

    data.py      readers: TSV/CSV with a header, JSONL, CoNLL token<TAB>tag (gzip-aware)
    tasks.py     label sets, tokenisation (first-sub-word NER labels), batching
    metrics.py   accuracy, macro-F1, majority baseline, strict IOB2 entity P/R/F1
    training.py  the run: plain PyTorch loop (pre-training's autocast, decay groups, AdamW
                 builder and LR schedule), early stopping, saving
    cli.py       the command line

Needs `transformers` (the `finetune` extra); importing this package does not.
"""
