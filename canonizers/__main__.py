'''``python -m canonizers``: the command line, see :py:mod:`canonizers.cli`.'''
import sys

from .cli import main

if __name__ == '__main__':
    sys.exit(main())
