//! End-to-end tests: they run the real `cairn` binary, as users and scripts do.

mod support;

mod adopt;
mod architecture;
mod browser;
mod clock;
mod cluster;
mod controls;
mod copy;
mod crash;
mod daemons;
mod damage;
mod durable;
mod dynamic;
mod ending;
mod examples;
mod faults;
mod graph;
mod help;
mod invalid_plans;
mod logs;
mod mariadb;
mod nodes;
mod operator;
mod pauses;

mod outage;
mod params;
mod postgres;
mod regressions;
mod remote;
mod secrets;
mod serve;
mod shown;
mod sizes;
mod sql;
mod waits;
mod web;
