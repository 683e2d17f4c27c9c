from medpipe.cli import entry

entry()
