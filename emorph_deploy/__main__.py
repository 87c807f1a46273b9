from emorph_deploy.cli.app import main

if __name__ == "__main__":
    main()
