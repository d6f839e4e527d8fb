"""Whole commands: the teacher pass, the search, the pipeline, plan, AOT compile, the CLI."""
