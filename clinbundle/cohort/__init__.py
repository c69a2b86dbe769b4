"""Batch inference over a cohort (`clinbundle predict`): cases from a folder or a PACS, one row
each in a resumable manifest and a table, through the same runtime and inference path as every
shipped format. A batch app: it may resolve `--model` through packaging's model source, never
import training code."""
