"""One module per command-line command. Each defines ``add_parser(subparsers)``, which adds
the command's parser and sets ``func`` to a function of the parsed arguments returning an
exit status. :mod:`dictionary_learning.cli` finds them here."""
