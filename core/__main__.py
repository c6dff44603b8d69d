from dbdeck.cli import main

main()
