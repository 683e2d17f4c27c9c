"""A DICOM node (`medpipe serve`): a Storage SCP receives series from a PACS, a durable SQLite queue routes each to
a bundle, and the results (DICOM-SEG, structured reports) go back by C-STORE. See docs/serve.md."""
