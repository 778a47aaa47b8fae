from child.cli import main

main()
