"""`python -m dbdeck.launch COMMAND [ARGS...]`: what bin/<command> executes."""

import sys

from dbdeck.cli import main, main_for

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] == "dbdeck":
        main(sys.argv[2:])
    else:
        main_for(sys.argv[1])(sys.argv[2:])
