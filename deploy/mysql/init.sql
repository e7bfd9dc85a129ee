-- deepseek-serve: the application database and its least-privilege user (MySQL 8, MariaDB 10.11).
--
-- Docker (the official mysql/mariadb image, compose.yaml): the entrypoint has already created
-- MYSQL_DATABASE and MYSQL_USER (with ALL PRIVILEGES on that database) when it runs this file
-- from /docker-entrypoint-initdb.d; this file narrows the grants. It names the default
-- `deepseek` database and 'deepseek' user: edit both if MYSQL_DATABASE / MYSQL_USER differ.
--
-- By hand, as an administrator, passing the application password in a session variable:
--   mysql -uroot -p --init-command="SET @app_password='<strong password>'" < deploy/mysql/init.sql
-- then run the app with DS_DATABASE_URL=mysql+asyncmy://deepseek:<password>@<host>:3306/deepseek
--
-- The application never connects as root.

CREATE DATABASE IF NOT EXISTS `deepseek` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;

-- create the user only when a password was given (the Docker entrypoint created it already)
SET @create_user = IF(@app_password IS NULL, 'DO 0',
                      CONCAT('CREATE USER IF NOT EXISTS ''deepseek''@''%'' IDENTIFIED BY ', QUOTE(@app_password)));
PREPARE create_user FROM @create_user;
EXECUTE create_user;
DEALLOCATE PREPARE create_user;

-- start from nothing: drops the ALL PRIVILEGES the Docker entrypoint granted
REVOKE ALL PRIVILEGES, GRANT OPTION FROM 'deepseek'@'%';

-- Only on the application database, never *.*:
--   SELECT, INSERT, UPDATE, DELETE   the application's own reads and writes
--   CREATE, ALTER, INDEX, DROP       Alembic migrations (`deepseek-serve db upgrade|downgrade`, and the
--                                    server's auto-migrate): create/alter tables, add/drop indexes,
--                                    drop tables on downgrade
--   REFERENCES                       foreign keys (conversations -> api_keys, messages -> conversations);
--                                    MySQL 8 checks it when a migration creates a foreign key
-- Not granted: GRANT OPTION, FILE, PROCESS, SUPER, CREATE USER, anything on other databases.
-- A stricter split: give these DDL grants to a separate migration user, run `deepseek-serve db
-- upgrade` with it, and leave the serving user SELECT, INSERT, UPDATE, DELETE with DS_DB_AUTO_MIGRATE=false.
GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP, REFERENCES ON `deepseek`.* TO 'deepseek'@'%';
