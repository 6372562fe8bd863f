from dsl.launcher.cli import main

main()
