from pipitctl.cli import main

main()
